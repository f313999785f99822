-- put_batch names the FIRST item (in request order) whose compare-and-set
-- check fails. 0002 took whichever mismatching row the join produced first,
-- so a batch with two stale items could name either (found by the KV model
-- test). Only the mismatch query changes: WITH ORDINALITY ... ORDER BY.
CREATE OR REPLACE FUNCTION kv.put_batch(
    p_tenants text[],
    p_namespaces text[],
    p_return_previous boolean[],
    p_starts integer[],
    p_counts integer[],
    p_keys text[],
    p_values bytea[],
    p_content_types text[],
    p_ttl_ms bigint[],
    p_if_revisions bigint[]
) RETURNS TABLE (
    r_entry integer,
    r_status text,
    r_revision bigint,
    r_key text,
    r_create_revision bigint,
    r_version bigint,
    r_expires_at timestamptz,
    r_prev_value bytea,
    r_prev_content_type text,
    r_prev_create_revision bigint,
    r_prev_mod_revision bigint,
    r_prev_version bigint,
    r_prev_expires_at timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    rev bigint;
    at timestamptz;
    i integer;
    first integer;
    last integer;
    bad_key text;
    bad_current bigint;
BEGIN
    SELECT s.current INTO rev FROM kv.store_revision s WHERE s.singleton FOR UPDATE;
    at := clock_timestamp();
    FOR i IN 1 .. coalesce(array_length(p_tenants, 1), 0) LOOP
        first := p_starts[i];
        last := p_starts[i] + p_counts[i] - 1;
        bad_key := NULL;
        SELECT u.k, coalesce(e.mod_revision, 0) INTO bad_key, bad_current
        FROM unnest(p_keys[first:last], p_if_revisions[first:last]) WITH ORDINALITY AS u(k, want, n)
        LEFT JOIN kv.entries e
          ON e.tenant = p_tenants[i] AND e.namespace = p_namespaces[i] AND e.key = u.k
         AND (e.expires_at IS NULL OR e.expires_at > at)
        WHERE u.want IS NOT NULL AND u.want <> coalesce(e.mod_revision, 0)
        ORDER BY u.n
        LIMIT 1;
        IF bad_key IS NOT NULL THEN
            RETURN QUERY SELECT i, 'mismatch'::text, rev, bad_key, NULL::bigint, NULL::bigint,
                NULL::timestamptz, NULL::bytea, NULL::text, NULL::bigint, bad_current, NULL::bigint,
                NULL::timestamptz;
            CONTINUE;
        END IF;
        rev := rev + 1;
        RETURN QUERY
        WITH prev AS (
            SELECT e.* FROM kv.entries e
            WHERE p_return_previous[i] AND e.tenant = p_tenants[i] AND e.namespace = p_namespaces[i]
              AND e.key = ANY (p_keys[first:last]) AND (e.expires_at IS NULL OR e.expires_at > at)
        ), up AS (
            INSERT INTO kv.entries AS e
                (tenant, namespace, key, value, content_type, create_revision, mod_revision, version, expires_at)
            SELECT p_tenants[i], p_namespaces[i], u.k, u.v, u.ct, rev, rev, 1,
                   CASE WHEN u.ttl > 0 THEN at + u.ttl * interval '1 millisecond' END
            FROM unnest(p_keys[first:last], p_values[first:last], p_content_types[first:last],
                        p_ttl_ms[first:last]) AS u(k, v, ct, ttl)
            ON CONFLICT (tenant, namespace, key) DO UPDATE SET
                value = excluded.value,
                content_type = excluded.content_type,
                mod_revision = excluded.mod_revision,
                expires_at = excluded.expires_at,
                create_revision = CASE WHEN e.expires_at IS NULL OR e.expires_at > at
                                       THEN e.create_revision ELSE excluded.create_revision END,
                version = CASE WHEN e.expires_at IS NULL OR e.expires_at > at THEN e.version + 1 ELSE 1 END
            RETURNING e.key, e.value, e.content_type, e.create_revision, e.version, e.expires_at
        ), logged AS (
            INSERT INTO kv.changes (revision, tenant, namespace, key, kind, value, content_type,
                                    create_revision, version, expires_at)
            SELECT rev, p_tenants[i], p_namespaces[i], up.key, 1, up.value, up.content_type,
                   up.create_revision, up.version, up.expires_at
            FROM up
        )
        SELECT i, 'ok'::text, rev, up.key, up.create_revision, up.version, up.expires_at,
               prev.value, prev.content_type, prev.create_revision, prev.mod_revision, prev.version,
               prev.expires_at
        FROM up LEFT JOIN prev ON prev.key = up.key;
    END LOOP;
    UPDATE kv.store_revision s SET current = rev WHERE s.singleton;
    PERFORM pg_notify('strata_kv', rev::text);
END
$$;
