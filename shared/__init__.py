"""Code both daemons use: the fragment codec, the messages, AirVantage wire formats, logs, config.

The protocol modules here are pure: no I/O, no clock reads, no async. The current time is always
passed in as an argument.
"""
