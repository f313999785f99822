-- pg_stat_statements, where this Postgres has it: GetDatabaseStats lists the
-- slowest statements from it (the server must also preload it, e.g.
-- shared_preload_libraries=pg_stat_statements; without that the view errors
-- and admin reports the statistics as unavailable). A server without the
-- extension, or an owner role not allowed to create it, is not an error.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements') THEN
        CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'pg_stat_statements not created: %', SQLERRM;
END
$$;
