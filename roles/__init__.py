"""One process, any set of roles: the gateway and the services as the components of one program.

``python -m roles`` hosts the roles ``STRATA_ROLES`` names ("all", the default,
or a comma-separated list of kv, tenants, vector, admin, gateway), as Loki and
Mimir run every component of one binary chosen by a target. Each role is built
exactly as its own process builds it (``services/<role>/app.py``,
``gateway/app.py``) and serves on its own port (``STRATA_<ROLE>_PORT``), so the
split shape and this one differ only in which process hosts what.
"""
