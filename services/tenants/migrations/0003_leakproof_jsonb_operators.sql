-- Under row-level security, Postgres applies a query's own conditions after
-- the policy unless their functions are LEAKPROOF, so a filter on a declared
-- index's path could never use that index. The functions behind the jsonb
-- operators that filters use (#>, =, <>, <, <=, >, >=) raise no errors that
-- depend on the data they read, so marking them LEAKPROOF reveals nothing.
-- Only a superuser may do this; elsewhere (a managed Postgres) filters stay
-- correct and simply do not use declared indexes.
DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        ALTER FUNCTION pg_catalog.jsonb_extract_path(jsonb, text[]) LEAKPROOF;
        ALTER FUNCTION pg_catalog.jsonb_eq(jsonb, jsonb) LEAKPROOF;
        ALTER FUNCTION pg_catalog.jsonb_ne(jsonb, jsonb) LEAKPROOF;
        ALTER FUNCTION pg_catalog.jsonb_lt(jsonb, jsonb) LEAKPROOF;
        ALTER FUNCTION pg_catalog.jsonb_le(jsonb, jsonb) LEAKPROOF;
        ALTER FUNCTION pg_catalog.jsonb_gt(jsonb, jsonb) LEAKPROOF;
        ALTER FUNCTION pg_catalog.jsonb_ge(jsonb, jsonb) LEAKPROOF;
    ELSE
        RAISE NOTICE 'not a superuser: declared record indexes will not serve filters under row-level security';
    END IF;
END
$$;
