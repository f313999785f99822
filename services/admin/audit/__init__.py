"""The audit log: read by ListAuditEvents; written by :func:`shared.audit.record_audit` wherever a
change is made."""
