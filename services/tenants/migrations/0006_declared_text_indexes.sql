-- Filters compare strings in code-point order, as text:
-- (("data" #>> '{a,b}') COLLATE "C") < $n, and OPERATOR_PREFIX is
-- starts_with() on that same text (shared/filters.py). The jsonb index of a
-- declaration, on ("data" #> '{a,b}'), cannot serve either, so a declared path
-- now gets a second index on that text expression, named <name>_text; the
-- paths declared before this migration get theirs here. Otherwise
-- declare_index is unchanged from 0005.

-- As in 0003: under row-level security a condition is only an index
-- condition when its functions are LEAKPROOF. The text comparisons and
-- starts_with already are; the text extraction and jsonb_typeof raise no
-- error that depends on the data they read.
DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        ALTER FUNCTION pg_catalog.jsonb_extract_path_text(jsonb, text[]) LEAKPROOF;
        ALTER FUNCTION pg_catalog.jsonb_typeof(jsonb) LEAKPROOF;
    END IF;
END
$$;

-- The '{a,b}' literal of a path, as json_path_sql writes it: a segment spelled
-- null is quoted, or it would read as SQL NULL.
CREATE FUNCTION tenants.path_literal(p_path text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog AS $$
    SELECT '{' || string_agg(CASE WHEN lower(s) = 'null' THEN '"' || s || '"' ELSE s END, ',' ORDER BY n) || '}'
    FROM unnest(string_to_array(p_path, '.')) WITH ORDINALITY AS u(s, n)
$$;

-- Both indexes of one declaration; the expressions must match shared/filters.py
-- exactly for the planner to use them.
CREATE FUNCTION tenants.create_record_indexes(p_name text, p_collection text, p_path text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, tenants AS $$
BEGIN
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON tenants.records (tenant, ("data" #> %L)) WHERE collection = %L',
        p_name, tenants.path_literal(p_path), p_collection
    );
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON tenants.records (tenant, (("data" #>> %L) COLLATE "C")) '
        'WHERE collection = %L',
        p_name || '_text', tenants.path_literal(p_path), p_collection
    );
END
$$;
REVOKE ALL ON FUNCTION tenants.create_record_indexes(text, text, text) FROM PUBLIC;

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
    PERFORM pg_advisory_xact_lock(
        hashtextextended('strata.tenants.declare_index/' || p_collection || '/' || p_path, 0)
    );
    SELECT * INTO existing FROM tenants.record_indexes WHERE collection = p_collection AND path = p_path;
    IF FOUND THEN
        RETURN QUERY SELECT existing.name, false, existing.created_at;
        RETURN;
    END IF;
    index_name := 'records_by_' || substr(md5(p_collection || '/' || p_path), 1, 16);
    PERFORM tenants.create_record_indexes(index_name, p_collection, p_path);
    INSERT INTO tenants.record_indexes (collection, path, name) VALUES (p_collection, p_path, index_name);
    RETURN QUERY SELECT index_name, true, now();
END
$$;

SELECT tenants.create_record_indexes(name, collection, path) FROM tenants.record_indexes;
