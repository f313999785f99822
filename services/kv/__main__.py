"""Run the KV service: ``python -m services.kv``."""

from services.kv.app import main

main()
