-- A cumulative count of expired leases for /metrics (dlw_lease_expiries_total). A sequence, not a
-- counter row: nextval never waits for another transaction, so the expiry sweep that every claim
-- runs takes no extra lock. A rolled-back sweep still advances it (a sequence is not
-- transactional); for a monitoring counter that over-count is harmless.

SET ROLE dlw_owner;

CREATE SEQUENCE dlw.lease_expiries AS bigint;
COMMENT ON SEQUENCE dlw.lease_expiries IS
    'Leases the expiry sweep found expired (requeued or failed), since the database was created; read by dlw.platform_metrics()';
GRANT USAGE, SELECT ON SEQUENCE dlw.lease_expiries TO dlw_system;

RESET ROLE;
