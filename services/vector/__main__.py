"""Run the vector service: ``python -m services.vector``."""

from services.vector.app import main

main()
