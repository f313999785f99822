"""Run the tenants service: ``python -m services.tenants``."""

from services.tenants.app import main

main()
