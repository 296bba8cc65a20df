"""Drop-in replacements with other libraries' signatures (mamba_ssm, later flash_attn)."""
