-- Rebuilding a collection's index, and bounded waits for the locks that
-- index DDL takes on the shared points table.
--
-- An IVFFlat index learns its lists from the rows present when it is built,
-- so one built on an empty collection searches poorly; HNSW parameters can
-- only change by building again. vector.rebuild_index builds the
-- collection's index anew from its current rows, with the index settings
-- stored on the collection.
--
-- Locks, because every collection shares vector.points:
--   * SHARE ROW EXCLUSIVE on the table for the whole build: writes to
--     vector.points wait (all tenants), reads do not, and two rebuilds take
--     turns instead of deadlocking on the later lock upgrade;
--   * ACCESS EXCLUSIVE for the moment the old index is dropped and the new
--     one renamed into its place, until commit.
-- lock_timeout bounds how long either waits behind running statements (and
-- so how long statements queued behind the rebuild wait): past it the call
-- fails with 55P03 and nothing changes.

CREATE FUNCTION vector.rebuild_index(p_collection bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, vector
SET lock_timeout = '5s'
SET maintenance_work_mem = '256MB'
AS $$
DECLARE
    c vector.collections%ROWTYPE;
    ops text;
    fresh text := 'points_' || p_collection || '_rebuilt';
BEGIN
    SELECT * INTO c FROM vector.collections
    WHERE id = p_collection AND tenant = current_setting('strata.tenant_id', true);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such collection' USING ERRCODE = '42704';
    END IF;
    LOCK TABLE vector.points IN SHARE ROW EXCLUSIVE MODE;
    IF c.index_kind <> 0 THEN
        ops := CASE c.metric WHEN 1 THEN 'vector_cosine_ops' WHEN 2 THEN 'vector_l2_ops' ELSE 'vector_ip_ops' END;
        IF c.index_kind = 1 THEN
            EXECUTE format(
                'CREATE INDEX %I ON vector.points USING hnsw ((embedding::vector(%s)) %s) '
                'WITH (m = %s, ef_construction = %s) WHERE collection_id = %s',
                fresh, c.dimension, ops, c.hnsw_m, c.hnsw_ef_construction, c.id
            );
        ELSE
            EXECUTE format(
                'CREATE INDEX %I ON vector.points USING ivfflat ((embedding::vector(%s)) %s) '
                'WITH (lists = %s) WHERE collection_id = %s',
                fresh, c.dimension, ops, c.ivfflat_lists, c.id
            );
        END IF;
    END IF;
    EXECUTE format('DROP INDEX IF EXISTS vector.%I', 'points_' || c.id);
    IF c.index_kind <> 0 THEN
        EXECUTE format('ALTER INDEX vector.%I RENAME TO %I', fresh, 'points_' || c.id);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION vector.rebuild_index(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vector.rebuild_index(bigint) TO strata_app;

-- DeleteCollection's DROP INDEX waits at most this long for the table lock.
ALTER FUNCTION vector.drop_index(bigint) SET lock_timeout = '5s';
