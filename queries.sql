-- Named queries. Each starts with a `-- name: NAME` line; db.py loads them by
-- name. Parameters are psycopg's %(name)s placeholders, never string-built.

-- ======================================================================
-- schema
-- ======================================================================

-- name: schema_version
SELECT coalesce(max(version), 0) AS version FROM schema_version;

-- ======================================================================
-- instances
-- ======================================================================

-- name: instance_get
SELECT * FROM instance WHERE id = %(id)s;

-- name: instance_get_for_update
SELECT * FROM instance WHERE id = %(id)s FOR UPDATE;

-- name: instance_get_owned
SELECT * FROM instance WHERE id = %(id)s AND user_id = %(user_id)s;

-- name: instance_by_name
SELECT * FROM instance WHERE user_id = %(user_id)s AND name = %(name)s;

-- name: instance_list_for_user
SELECT * FROM instance WHERE user_id = %(user_id)s ORDER BY id;

-- name: instance_list_all
SELECT * FROM instance ORDER BY id;

-- name: instance_list_running
SELECT * FROM instance WHERE status = 'running' ORDER BY id;

-- name: secret_env_values
-- Every environment value piDeploy gives a container, or will (an unfinished task's config):
-- what no tool output or trace may show (tools.secret_values).
SELECT env.value FROM instance, jsonb_each_text(
    CASE WHEN jsonb_typeof(config -> 'env') = 'object' THEN config -> 'env' ELSE '{}' END) AS env
UNION
SELECT env.value FROM task, jsonb_each_text(
    CASE WHEN jsonb_typeof(params -> 'config' -> 'env') = 'object' THEN params -> 'config' -> 'env'
         ELSE '{}' END) AS env
WHERE task.status IN ('queued', 'running');

-- name: instance_list_routable
-- The rows a route may belong to: running ones, and updating ones (which keep a live route).
SELECT * FROM instance WHERE status IN ('running', 'updating') ORDER BY id;

-- name: instance_insert
INSERT INTO instance (user_id, name, status, image, config)
VALUES (%(user_id)s, %(name)s, 'creating', %(image)s, %(config)s)
RETURNING *;

-- name: instance_set_runtime
-- Container, port and storage of an instance, with its status, in one statement.
UPDATE instance
SET status = %(status)s, container_id = %(container_id)s, port = %(port)s,
    storage_path = %(storage_path)s, image = %(image)s, config = %(config)s,
    last_error = %(last_error)s, updated_at = now()
WHERE id = %(id)s
RETURNING *;

-- name: instance_settle_unbuilt_create
-- A create that ended before building anything: error, unless something else settled it first.
UPDATE instance SET status = 'error', last_error = %(last_error)s, updated_at = now()
WHERE id = %(id)s AND status = 'creating'
RETURNING *;

-- name: instance_delete
DELETE FROM instance WHERE id = %(id)s RETURNING *;

-- name: instance_was_created
-- Whether an instance's create ever finished: its `created` event (the history outlives statuses).
SELECT EXISTS (SELECT 1 FROM event WHERE instance_id = %(id)s AND kind = 'created') AS created;

-- name: instance_ports_taken
SELECT port FROM instance WHERE port IS NOT NULL;

-- name: instance_try_lock
-- A session advisory lock per instance, held by a mutating tool for its whole run.
SELECT pg_try_advisory_lock(%(space)s, %(id)s::int) AS ok;

-- name: instance_unlock
SELECT pg_advisory_unlock(%(space)s, %(id)s::int) AS ok;

-- name: routes_lock
-- Read the running instances and apply the route map under one transaction lock.
SELECT pg_advisory_xact_lock(%(key)s) AS ok;

-- name: instance_count_by_status
SELECT status, count(*) AS n FROM instance GROUP BY status ORDER BY status;

-- ======================================================================
-- events (append-only)
-- ======================================================================

-- name: event_insert
INSERT INTO event (instance_id, user_id, task_id, kind, detail)
VALUES (%(instance_id)s, %(user_id)s, %(task_id)s, %(kind)s, %(detail)s)
RETURNING *;

-- name: event_list_for_instance
SELECT * FROM event WHERE instance_id = %(instance_id)s ORDER BY id DESC LIMIT %(limit)s;

-- name: event_list_for_user
SELECT * FROM event WHERE user_id = %(user_id)s ORDER BY id DESC LIMIT %(limit)s;

-- name: event_list_all
SELECT * FROM event ORDER BY id DESC LIMIT %(limit)s;

-- name: event_last_of_kind
SELECT * FROM event WHERE instance_id = %(instance_id)s AND kind = %(kind)s ORDER BY id DESC LIMIT 1;

-- ======================================================================
-- model cool-down
-- ======================================================================

-- name: model_cooldown_set
INSERT INTO model_cooldown (model, until, reason)
VALUES (%(model)s, now() + make_interval(secs => %(seconds)s), %(reason)s)
ON CONFLICT (model) DO UPDATE SET until = excluded.until, reason = excluded.reason;

-- name: model_cooldown_active
SELECT model, until, reason FROM model_cooldown WHERE until > now();

-- name: model_cooldown_clear
DELETE FROM model_cooldown WHERE model = %(model)s;

-- ======================================================================
-- tasks (the queue's own queries follow in their section)
-- ======================================================================

-- name: task_set_instance
-- instance_create submitted without an instance: the tool made the row.
UPDATE task SET instance_id = %(instance_id)s, updated_at = now() WHERE id = %(id)s;

-- ======================================================================
-- tasks: the queue (tasks.py). A task is claimable when it is queued, or
-- running with a dead lease and attempts left, and no other unfinished task
-- of its instance comes before it (or holds a live lease).
-- ======================================================================

-- name: task_insert
-- A dedupe key already held by an unfinished task inserts nothing (index task_dedupe_unfinished).
INSERT INTO task (type, params, instance_id, user_id, dedupe_key, max_attempts)
VALUES (%(type)s, %(params)s, %(instance_id)s, %(user_id)s, %(dedupe_key)s, %(max_attempts)s)
ON CONFLICT (dedupe_key) WHERE status IN ('queued', 'running') AND dedupe_key IS NOT NULL DO NOTHING
RETURNING *;

-- name: task_unfinished_by_dedupe_key
SELECT * FROM task WHERE dedupe_key = %(dedupe_key)s AND status IN ('queued', 'running');

-- name: task_unfinished_for_instance
SELECT * FROM task WHERE instance_id = %(instance_id)s AND status IN ('queued', 'running') ORDER BY id;

-- name: task_claim
WITH candidate AS (
    SELECT t.id FROM task t
    WHERE (t.status = 'queued'
           OR (t.status = 'running' AND t.lease_expires_at < now() AND t.attempts < t.max_attempts))
      AND NOT EXISTS (
          SELECT 1 FROM task o
          WHERE o.instance_id = t.instance_id AND o.id <> t.id AND o.status IN ('queued', 'running')
            AND (o.id < t.id OR o.lease_expires_at > now()))
    ORDER BY t.id
    LIMIT 1
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE task
SET status = 'running', locked_by = %(worker)s,
    lease_expires_at = now() + make_interval(secs => %(lease_s)s),
    attempts = task.attempts + 1, started_at = now(), updated_at = now()
FROM candidate
WHERE task.id = candidate.id
RETURNING task.*;

-- name: task_renew
-- No row back: the task is no longer ours (reclaimed, released or finished).
UPDATE task SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
WHERE id = %(id)s AND locked_by = %(worker)s AND status = 'running'
RETURNING cancel_requested;

-- name: task_finish
-- An instance_create that ended unbuilt: its instance is settled in the same transaction
-- (instances.settle_unbuilt_create, the one writer of instance.status).
UPDATE task
SET status = %(status)s, result = %(result)s, error_class = %(error_class)s, last_error = %(last_error)s,
    trace_file = %(trace_file)s, turns = %(turns)s, cost_usd = %(cost_usd)s, duration_s = %(duration_s)s,
    locked_by = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()
WHERE id = %(id)s AND locked_by = %(worker)s AND status = 'running'
RETURNING *;

-- name: task_retry_later
-- A failed attempt is treated like a dead worker's: the lease runs out after
-- the back-off and any worker reclaims the task (or task_fail_exhausted ends it).
UPDATE task
SET error_class = %(error_class)s, last_error = %(last_error)s,
    lease_expires_at = now() + make_interval(secs => %(delay_s)s), updated_at = now()
WHERE id = %(id)s AND locked_by = %(worker)s AND status = 'running'
RETURNING *;

-- name: task_release
-- Graceful shutdown: back to the queue, and the claim's attempt is given back.
UPDATE task
SET status = 'queued', locked_by = NULL, lease_expires_at = NULL,
    attempts = greatest(task.attempts - 1, 0), updated_at = now()
WHERE id = %(id)s AND locked_by = %(worker)s AND status = 'running'
RETURNING *;

-- name: task_fail_exhausted
-- Dead leases with no attempts left end failed (an instance they were creating: Queue.sweep).
UPDATE task
SET status = 'failed', error_class = coalesce(error_class, 'infra_unavailable'),
    last_error = coalesce(last_error, 'worker ' || locked_by || ' stopped renewing its lease')
        || ' (attempt ' || attempts || ' of ' || max_attempts || ')',
    locked_by = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()
WHERE status = 'running' AND lease_expires_at < now() AND attempts >= max_attempts
RETURNING *;

-- name: task_cancel
-- Queued: cancelled at once. Running: flagged; its worker sees the flag at its next lease renewal.
UPDATE task
SET cancel_requested = true,
    status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
    error_class = CASE WHEN status = 'queued' THEN 'cancelled' ELSE error_class END,
    last_error = CASE WHEN status = 'queued' THEN 'cancelled before it ran' ELSE last_error END,
    finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
    updated_at = now()
WHERE id = %(id)s AND status IN ('queued', 'running')
RETURNING *;

-- name: task_get
SELECT * FROM task WHERE id = %(id)s;

-- name: task_get_owned
SELECT * FROM task WHERE id = %(id)s AND user_id = %(user_id)s;

-- name: task_list
-- Newest first; each filter applies only when given.
SELECT * FROM task
WHERE (%(user_id)s::text IS NULL OR user_id = %(user_id)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(instance_id)s::bigint IS NULL OR instance_id = %(instance_id)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: event_list_for_instance_user
SELECT * FROM event WHERE instance_id = %(instance_id)s AND user_id = %(user_id)s ORDER BY id DESC LIMIT %(limit)s;

-- name: event_last_per_instance_for_user
-- The newest event of each of the user's instances (the dashboard's "last event"), by the event_instance index.
SELECT last.* FROM instance
CROSS JOIN LATERAL (
    SELECT * FROM event WHERE event.instance_id = instance.id ORDER BY event.id DESC LIMIT 1
) AS last
WHERE instance.user_id = %(user_id)s;

-- name: metrics_tasks
SELECT type, status, count(*)::int AS n, coalesce(sum(duration_s), 0)::float8 AS duration_sum,
       count(duration_s)::int AS duration_count, coalesce(sum(cost_usd), 0)::float8 AS cost_usd
FROM task GROUP BY type, status ORDER BY type, status;

-- name: metrics_heartbeat
SELECT count(*)::int AS rounds, coalesce(sum(repaired), 0)::int AS repairs FROM heartbeat_round;

-- ======================================================================
-- heartbeat (heartbeat.py)
-- ======================================================================

-- name: heartbeat_try_lock
-- One heartbeat round at a time across processes (serve and cron): a session lock.
SELECT pg_try_advisory_lock(%(key)s) AS ok;

-- name: heartbeat_unlock
SELECT pg_advisory_unlock(%(key)s) AS ok;

-- name: heartbeat_busy_instances
-- Instances some unfinished task is about, or whose per-instance lock someone holds (a tool at
-- work, in any process on this database): the heartbeat leaves them to whoever it is.
SELECT instance_id FROM task
WHERE status IN ('queued', 'running') AND instance_id IS NOT NULL
UNION
SELECT objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND classid = %(space)s::oid AND objsubid = 2 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database());

-- name: heartbeat_counters_set
-- Recovery bookkeeping only: updated_at is left alone (it dates the last status change).
UPDATE instance
SET recovery_failures = %(recovery_failures)s, next_recovery_at = %(next_recovery_at)s,
    healthy_since = %(healthy_since)s
WHERE id = %(id)s;

-- name: heartbeat_round_insert
INSERT INTO heartbeat_round (started_at, duration_s, drifts, repaired, unrepaired, cost_usd, source, trace_file)
VALUES (%(started_at)s, %(duration_s)s, %(drifts)s, %(repaired)s, %(unrepaired)s, %(cost_usd)s, %(source)s,
        %(trace_file)s);

-- name: heartbeat_round_prune
-- Retention: the rounds' history beyond PIDEPLOY_RETENTION_DAYS (their trace files go too).
DELETE FROM heartbeat_round WHERE started_at < %(before)s;

-- name: heartbeat_round_recent
SELECT * FROM heartbeat_round ORDER BY id DESC LIMIT %(limit)s;
