-- The executor queue summary (migrations/0016.flat_costs.sql) gets a primary key led by
-- tenant_id, like every tenant table: `dlw doctor --citus` requires one (docs/scale-out.md), and
-- a change row is then addressable on its own.

SET ROLE dlw_owner;

ALTER TABLE dlw.executor_queue
    ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY,
    ADD CONSTRAINT executor_queue_pkey PRIMARY KEY (tenant_id, id);
COMMENT ON COLUMN dlw.executor_queue.id IS
    'Row identity within the tenant (summary row or change row); with tenant_id the primary key';

RESET ROLE;
