"""The audit log: read by ListAuditEvents; written by :func:`shared.storage.audit.record_audit` wherever a
change is made."""
