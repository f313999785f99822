-- Concurrent DeclareIndex calls for one (collection, path) raced: each
-- checked tenants.record_indexes, found nothing, and ran CREATE INDEX and
-- INSERT, so all but one failed (42P07 duplicate_table or 23505) where the
-- proto promises the existing index with created = false. The function now
-- first takes a transaction-level advisory lock keyed on (collection, path)
-- (an index covers every tenant, so the tenant is not part of the key): the
-- next caller waits until the first one's transaction ends, and its check,
-- a new statement with a new snapshot under READ COMMITTED, sees the row.
-- Otherwise unchanged from 0002.

CREATE OR REPLACE FUNCTION tenants.declare_index(p_collection text, p_path text)
RETURNS TABLE (r_name text, r_created boolean, r_created_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, tenants AS $$
DECLARE
    segments text[];
    index_name text;
    existing tenants.record_indexes%ROWTYPE;
BEGIN
    IF p_collection !~ '^[A-Za-z0-9_-]{1,64}$' THEN
        RAISE EXCEPTION 'bad collection' USING ERRCODE = '22023';
    END IF;
    segments := string_to_array(p_path, '.');
    IF array_length(segments, 1) IS NULL OR array_length(segments, 1) > 16
       OR EXISTS (SELECT 1 FROM unnest(segments) s WHERE s !~ '^[A-Za-z0-9_-]{1,64}$') THEN
        RAISE EXCEPTION 'bad path' USING ERRCODE = '22023';
    END IF;
    -- Held until the caller's transaction ends (after its INSERT commits).
    -- Neither part can hold '/', so the text names one (collection, path);
    -- two pairs whose hashes collide only wait for each other.
    PERFORM pg_advisory_xact_lock(
        hashtextextended('strata.tenants.declare_index/' || p_collection || '/' || p_path, 0)
    );
    SELECT * INTO existing FROM tenants.record_indexes WHERE collection = p_collection AND path = p_path;
    IF FOUND THEN
        RETURN QUERY SELECT existing.name, false, existing.created_at;
        RETURN;
    END IF;
    index_name := 'records_by_' || substr(md5(p_collection || '/' || p_path), 1, 16);
    -- The expression must match shared/filters.py's json_path_sql exactly
    -- for the planner to use the index: ("data" #> '{a,b}').
    EXECUTE format(
        'CREATE INDEX %I ON tenants.records (tenant, ("data" #> %L)) WHERE collection = %L',
        index_name,
        -- A segment spelled null is quoted, as json_path_sql does, or it would read as SQL NULL.
        '{' || (SELECT string_agg(CASE WHEN lower(s) = 'null' THEN '"' || s || '"' ELSE s END, ',' ORDER BY n)
                FROM unnest(segments) WITH ORDINALITY AS u(s, n)) || '}',
        p_collection
    );
    INSERT INTO tenants.record_indexes (collection, path, name) VALUES (p_collection, p_path, index_name);
    RETURN QUERY SELECT index_name, true, now();
END
$$;
REVOKE ALL ON FUNCTION tenants.declare_index(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenants.declare_index(text, text) TO strata_app;
