-- pgbench script of the create-task benchmark: the admission SQL of POST /api/v1/tasks, run
-- directly as dlw_app (run with -M prepared -D tmin=FIRST -D tmax=LAST: a random tenant each
-- transaction, like the HTTP load generator). The same body as the HTTP requests.
\set tid random(:tmin, :tmax)
BEGIN;
SELECT dlw.set_context(:tid, 'bench', 'tenant_operator');
SELECT * FROM dlw.create_task(NULL, 'default', 'bench-org/bench-model', 'main', 0, '[{"path": "model.safetensors", "size": 1048576, "sha256": null}]'::jsonb, NULL, NULL, 2000);
COMMIT;
