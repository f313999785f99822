"""Backups, restores and branches: the calls in :mod:`.servicer` and :mod:`.backups`; the branch
registry (:mod:`.registry`), the owner role (:mod:`.owner`), the pg tools (:mod:`.tools`), a restore's
upload and its vetting (:mod:`.upload`, :mod:`.archives`), point-in-time branches (:mod:`.pitr`) and
the WAL archive they come from (:mod:`.wal_archive`)."""
