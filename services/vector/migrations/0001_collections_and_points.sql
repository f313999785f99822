-- Vector collections and points, per tenant, under row-level security.
--
-- All points share one table with an untyped `vector` column; each
-- collection gets its own partial expression index on
-- (embedding::vector(<dimension>)), which is what lets collections of
-- different dimensions live together. Queries use the same expression so the
-- planner matches the index. The service role cannot create indexes on a
-- table it does not own: vector.build_index / vector.drop_index are
-- SECURITY DEFINER functions that only act on the current tenant's
-- collections.

CREATE SCHEMA vector;
GRANT USAGE ON SCHEMA vector TO strata_app;

CREATE TABLE vector.collections (
    id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    tenant text NOT NULL,
    name text NOT NULL,
    dimension integer NOT NULL CHECK (dimension BETWEEN 1 AND 16000),
    metric smallint NOT NULL CHECK (metric IN (1, 2, 3)),      -- Metric: cosine, l2, inner product
    index_kind smallint NOT NULL CHECK (index_kind IN (0, 1, 2)),  -- none, hnsw, ivfflat
    hnsw_m integer NOT NULL DEFAULT 16,
    hnsw_ef_construction integer NOT NULL DEFAULT 64,
    ivfflat_lists integer NOT NULL DEFAULT 100,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

CREATE TABLE vector.points (
    collection_id bigint NOT NULL REFERENCES vector.collections (id) ON DELETE CASCADE,
    tenant text NOT NULL,
    id text NOT NULL,
    embedding vector NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    text text NOT NULL DEFAULT '',
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED,
    PRIMARY KEY (collection_id, id)
);
CREATE INDEX points_text ON vector.points USING gin (tsv);

ALTER TABLE vector.collections ENABLE ROW LEVEL SECURITY;
ALTER TABLE vector.collections FORCE ROW LEVEL SECURITY;
CREATE POLICY collections_of_the_current_tenant ON vector.collections
    USING (tenant = current_setting('strata.tenant_id', true))
    WITH CHECK (tenant = current_setting('strata.tenant_id', true));
ALTER TABLE vector.points ENABLE ROW LEVEL SECURITY;
ALTER TABLE vector.points FORCE ROW LEVEL SECURITY;
CREATE POLICY points_of_the_current_tenant ON vector.points
    USING (tenant = current_setting('strata.tenant_id', true))
    WITH CHECK (tenant = current_setting('strata.tenant_id', true));

GRANT SELECT, INSERT, UPDATE, DELETE ON vector.collections, vector.points TO strata_app;

-- The index of one collection of the current tenant.
CREATE FUNCTION vector.build_index(p_collection bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, vector AS $$
DECLARE
    c vector.collections%ROWTYPE;
    ops text;
BEGIN
    SELECT * INTO c FROM vector.collections
    WHERE id = p_collection AND tenant = current_setting('strata.tenant_id', true);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such collection' USING ERRCODE = '42704';
    END IF;
    IF c.index_kind = 0 THEN
        RETURN;
    END IF;
    ops := CASE c.metric WHEN 1 THEN 'vector_cosine_ops' WHEN 2 THEN 'vector_l2_ops' ELSE 'vector_ip_ops' END;
    IF c.index_kind = 1 THEN
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS %I ON vector.points USING hnsw ((embedding::vector(%s)) %s) '
            'WITH (m = %s, ef_construction = %s) WHERE collection_id = %s',
            'points_' || c.id, c.dimension, ops, c.hnsw_m, c.hnsw_ef_construction, c.id
        );
    ELSE
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS %I ON vector.points USING ivfflat ((embedding::vector(%s)) %s) '
            'WITH (lists = %s) WHERE collection_id = %s',
            'points_' || c.id, c.dimension, ops, c.ivfflat_lists, c.id
        );
    END IF;
END
$$;

CREATE FUNCTION vector.drop_index(p_collection bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, vector AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM vector.collections
                   WHERE id = p_collection AND tenant = current_setting('strata.tenant_id', true)) THEN
        RAISE EXCEPTION 'no such collection' USING ERRCODE = '42704';
    END IF;
    EXECUTE format('DROP INDEX IF EXISTS vector.%I', 'points_' || p_collection);
END
$$;
REVOKE ALL ON FUNCTION vector.build_index(bigint), vector.drop_index(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vector.build_index(bigint), vector.drop_index(bigint) TO strata_app;
