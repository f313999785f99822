-- The admin scope used to reach every tenant; it is now a tenant's own
-- administrator, and "operator" is the deployment's. Keys made before keep
-- what they could do: every admin key is an operator key too. Revoke and
-- re-issue them as plain admin keys where that is all a holder needs.
UPDATE admin.api_keys SET scopes = array_append(scopes, 'operator')
WHERE 'admin' = ANY (scopes) AND NOT 'operator' = ANY (scopes);
