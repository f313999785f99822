"""Run the admin service: ``python -m services.admin``."""

from services.admin.app import main

main()
