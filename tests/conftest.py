"""Suite-wide fixtures. Tier-specific fixtures live beside their tests."""
