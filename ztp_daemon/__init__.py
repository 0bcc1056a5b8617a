"""The device daemon: key, CSR and certificate-fragment state machine, then the MQTT publisher."""
