-- The KV store: live entries, a change log for watch, and one revision counter.
--
-- Every writer first locks the single store_revision row and only then reads
-- and writes entries (each statement of a plpgsql function takes a fresh
-- snapshot, so after the lock it sees every earlier commit). Revisions are
-- therefore handed out in commit order: a watcher that has read everything up
-- to revision N can never later find a smaller revision committed. The
-- functions run in one round trip, so the lock is held only inside Postgres.

CREATE SCHEMA kv;
GRANT USAGE ON SCHEMA kv TO strata_app;

CREATE TABLE kv.store_revision (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    current bigint NOT NULL
);
INSERT INTO kv.store_revision VALUES (true, 0);

-- Apart from store_revision, so compaction never waits on writers.
CREATE TABLE kv.compaction (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    revision bigint NOT NULL
);
INSERT INTO kv.compaction VALUES (true, 0);

-- Keys use the "C" collation: ordering is the byte order of UTF-8, i.e. code
-- point order, the order List promises.
-- Every key belongs to a tenant: each tenant has its own namespaces, and
-- the tenant comes from the caller's signed identity, never from the request.
CREATE TABLE kv.entries (
    tenant text NOT NULL,
    namespace text NOT NULL,
    key text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    content_type text NOT NULL,
    create_revision bigint NOT NULL,
    mod_revision bigint NOT NULL,
    version bigint NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (tenant, namespace, key)
);
CREATE INDEX entries_expiring ON kv.entries (expires_at) WHERE expires_at IS NOT NULL;

-- kind: 1 put, 2 delete, 3 expire (the EventType numbers of kv.proto).
CREATE TABLE kv.changes (
    revision bigint NOT NULL,
    tenant text NOT NULL,
    namespace text NOT NULL,
    key text COLLATE "C" NOT NULL,
    kind smallint NOT NULL CHECK (kind IN (1, 2, 3)),
    value bytea NOT NULL DEFAULT '',
    content_type text NOT NULL DEFAULT '',
    create_revision bigint NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 0,
    expires_at timestamptz,
    PRIMARY KEY (revision, tenant, namespace, key)
);
CREATE INDEX changes_by_namespace ON kv.changes (tenant, namespace, revision);

-- put_many: write keys of one namespace at one new revision, all or nothing.
-- p_if_revisions[i] NULL = unconditional; 0 = must not exist; else must equal
-- the live mod_revision. On a mismatch nothing is written and one row with
-- r_status 'mismatch' names the key and its current mod_revision (0: absent).
-- Otherwise one 'ok' row per key, with the previous live entry when asked.
CREATE FUNCTION kv.put_many(
    p_tenant text,
    p_namespace text,
    p_keys text[],
    p_values bytea[],
    p_content_types text[],
    p_ttl_ms bigint[],
    p_if_revisions bigint[],
    p_return_previous boolean
) RETURNS TABLE (
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
    bad_key text;
    bad_current bigint;
BEGIN
    SELECT s.current INTO rev FROM kv.store_revision s WHERE s.singleton FOR UPDATE;
    at := clock_timestamp();

    SELECT u.k, coalesce(e.mod_revision, 0) INTO bad_key, bad_current
    FROM unnest(p_keys, p_if_revisions) AS u(k, want)
    LEFT JOIN kv.entries e
      ON e.tenant = p_tenant AND e.namespace = p_namespace AND e.key = u.k
     AND (e.expires_at IS NULL OR e.expires_at > at)
    WHERE u.want IS NOT NULL AND u.want <> coalesce(e.mod_revision, 0)
    LIMIT 1;
    IF bad_key IS NOT NULL THEN
        RETURN QUERY SELECT 'mismatch'::text, rev, bad_key, NULL::bigint, NULL::bigint, NULL::timestamptz,
            NULL::bytea, NULL::text, NULL::bigint, bad_current, NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;

    UPDATE kv.store_revision s SET current = s.current + 1 WHERE s.singleton RETURNING s.current INTO rev;

    RETURN QUERY
    WITH prev AS (
        SELECT e.* FROM kv.entries e
        WHERE p_return_previous AND e.tenant = p_tenant AND e.namespace = p_namespace AND e.key = ANY (p_keys)
          AND (e.expires_at IS NULL OR e.expires_at > at)
    ), up AS (
        INSERT INTO kv.entries AS e
            (tenant, namespace, key, value, content_type, create_revision, mod_revision, version, expires_at)
        SELECT p_tenant, p_namespace, u.k, u.v, u.ct, rev, rev, 1,
               CASE WHEN u.ttl > 0 THEN at + u.ttl * interval '1 millisecond' END
        FROM unnest(p_keys, p_values, p_content_types, p_ttl_ms) AS u(k, v, ct, ttl)
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
        SELECT rev, p_tenant, p_namespace, up.key, 1, up.value, up.content_type, up.create_revision, up.version,
               up.expires_at
        FROM up
    )
    SELECT 'ok'::text, rev, up.key, up.create_revision, up.version, up.expires_at,
           prev.value, prev.content_type, prev.create_revision, prev.mod_revision, prev.version,
           prev.expires_at
    FROM up LEFT JOIN prev ON prev.key = up.key;

    PERFORM pg_notify('strata_kv', rev::text);
END
$$;

-- delete_range: delete the live keys of a namespace in [p_from, p_to) (p_to
-- NULL: no upper bound) at one new revision; with p_if_revision (single key
-- only) delete only when the live mod_revision matches. Returns one row per
-- deleted key ('ok'), or one 'none' row when nothing was live, or one
-- 'mismatch' row as put_many does. Previous values only when asked.
CREATE FUNCTION kv.delete_range(
    p_tenant text,
    p_namespace text,
    p_from text,
    p_to text,
    p_if_revision bigint,
    p_return_previous boolean
) RETURNS TABLE (
    r_status text,
    r_revision bigint,
    r_key text,
    r_value bytea,
    r_content_type text,
    r_create_revision bigint,
    r_mod_revision bigint,
    r_version bigint,
    r_expires_at timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    rev bigint;
    at timestamptz;
    live_revision bigint;
BEGIN
    SELECT s.current INTO rev FROM kv.store_revision s WHERE s.singleton FOR UPDATE;
    at := clock_timestamp();

    IF p_if_revision IS NOT NULL THEN
        SELECT e.mod_revision INTO live_revision FROM kv.entries e
        WHERE e.tenant = p_tenant AND e.namespace = p_namespace AND e.key = p_from
          AND (e.expires_at IS NULL OR e.expires_at > at);
        IF coalesce(live_revision, 0) <> p_if_revision THEN
            RETURN QUERY SELECT 'mismatch'::text, rev, p_from, NULL::bytea, NULL::text, NULL::bigint,
                coalesce(live_revision, 0), NULL::bigint, NULL::timestamptz;
            RETURN;
        END IF;
    END IF;

    PERFORM 1 FROM kv.entries e
    WHERE e.tenant = p_tenant AND e.namespace = p_namespace AND e.key >= p_from COLLATE "C"
      AND (p_to IS NULL OR e.key < p_to COLLATE "C")
      AND (e.expires_at IS NULL OR e.expires_at > at)
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'none'::text, rev, NULL::text, NULL::bytea, NULL::text, NULL::bigint,
            NULL::bigint, NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;

    UPDATE kv.store_revision s SET current = s.current + 1 WHERE s.singleton RETURNING s.current INTO rev;

    RETURN QUERY
    WITH gone AS (
        DELETE FROM kv.entries e
        WHERE e.tenant = p_tenant AND e.namespace = p_namespace AND e.key >= p_from COLLATE "C"
          AND (p_to IS NULL OR e.key < p_to COLLATE "C")
          AND (e.expires_at IS NULL OR e.expires_at > at)
        RETURNING e.*
    ), logged AS (
        INSERT INTO kv.changes (revision, tenant, namespace, key, kind)
        SELECT rev, p_tenant, p_namespace, gone.key, 2 FROM gone
    )
    SELECT 'ok'::text, rev, gone.key,
           CASE WHEN p_return_previous THEN gone.value END,
           gone.content_type, gone.create_revision, gone.mod_revision, gone.version, gone.expires_at
    FROM gone;

    PERFORM pg_notify('strata_kv', rev::text);
END
$$;

-- sweep_expired: remove up to p_limit expired keys at one new revision, each
-- logged as an expire event. Returns how many were removed (0: no revision).
CREATE FUNCTION kv.sweep_expired(p_limit integer) RETURNS TABLE (r_revision bigint, r_removed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    rev bigint;
    at timestamptz;
    removed bigint;
BEGIN
    PERFORM 1 FROM kv.entries e WHERE e.expires_at <= clock_timestamp() LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, 0::bigint;
        RETURN;
    END IF;
    SELECT s.current INTO rev FROM kv.store_revision s WHERE s.singleton FOR UPDATE;
    at := clock_timestamp();
    -- Checked again under the lock: another sweeper may have been first.
    PERFORM 1 FROM kv.entries e WHERE e.expires_at <= at LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, 0::bigint;
        RETURN;
    END IF;
    UPDATE kv.store_revision s SET current = s.current + 1 WHERE s.singleton RETURNING s.current INTO rev;
    WITH victims AS (
        SELECT e.tenant, e.namespace, e.key FROM kv.entries e WHERE e.expires_at <= at
        ORDER BY e.expires_at LIMIT p_limit
    ), gone AS (
        DELETE FROM kv.entries e USING victims v
        WHERE e.tenant = v.tenant AND e.namespace = v.namespace AND e.key = v.key
        RETURNING e.tenant, e.namespace, e.key
    ), logged AS (
        INSERT INTO kv.changes (revision, tenant, namespace, key, kind)
        SELECT rev, gone.tenant, gone.namespace, gone.key, 3 FROM gone
        RETURNING 1
    )
    SELECT count(*) INTO removed FROM logged;
    PERFORM pg_notify('strata_kv', rev::text);
    RETURN QUERY SELECT rev, removed;
END
$$;

-- compact: forget change-log entries at or below p_revision (watchers asking
-- for them get REVISION_COMPACTED). Never moves backwards.
CREATE FUNCTION kv.compact(p_revision bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    done bigint;
BEGIN
    UPDATE kv.compaction c SET revision = greatest(c.revision, p_revision) WHERE c.singleton
    RETURNING c.revision INTO done;
    DELETE FROM kv.changes WHERE revision <= done;
    RETURN done;
END
$$;

GRANT SELECT ON kv.store_revision, kv.compaction, kv.entries, kv.changes TO strata_app;
GRANT UPDATE ON kv.store_revision, kv.compaction TO strata_app;
GRANT INSERT, UPDATE, DELETE ON kv.entries TO strata_app;
GRANT INSERT, DELETE ON kv.changes TO strata_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA kv TO strata_app;
