"""The cloud daemon: Kinesis consumer, CSR validation, idempotent AWS IoT issuance, delivery."""
