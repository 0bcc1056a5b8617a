"""The whole cloud on loopback: mosquitto brokers, moto with AWS-fidelity fixes, AirVantage."""
