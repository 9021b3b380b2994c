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

-- name: instance_insert
INSERT INTO instance (user_id, name, status, image, config)
VALUES (%(user_id)s, %(name)s, 'creating', %(image)s, %(config)s)
RETURNING *;

-- name: instance_set_status
UPDATE instance
SET status = %(status)s, last_error = %(last_error)s, updated_at = now()
WHERE id = %(id)s
RETURNING *;

-- name: instance_set_runtime
-- Container, port and storage of an instance, with its status, in one statement.
UPDATE instance
SET status = %(status)s, container_id = %(container_id)s, port = %(port)s,
    storage_path = %(storage_path)s, image = %(image)s, config = %(config)s,
    last_error = %(last_error)s, updated_at = now()
WHERE id = %(id)s
RETURNING *;

-- name: instance_delete
DELETE FROM instance WHERE id = %(id)s RETURNING *;

-- name: instance_ports_taken
SELECT port FROM instance WHERE port IS NOT NULL;

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
-- heartbeat (heartbeat.py)
-- ======================================================================

-- name: heartbeat_try_lock
-- One heartbeat round at a time across processes (serve and cron): a session lock.
SELECT pg_try_advisory_lock(%(key)s) AS ok;

-- name: heartbeat_unlock
SELECT pg_advisory_unlock(%(key)s) AS ok;

-- name: heartbeat_busy_instances
-- Instances some unfinished task works on: a transitional status there is not stuck.
SELECT DISTINCT instance_id FROM task
WHERE status IN ('queued', 'running') AND instance_id IS NOT NULL;

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
