-- Functions are not executable by PUBLIC unless a file of sql/ grants them explicitly.
-- PostgreSQL's default grants EXECUTE on every new function to PUBLIC; for the roles that own
-- DLW's functions that default is turned off, so a forgotten REVOKE fails closed.
ALTER DEFAULT PRIVILEGES FOR ROLE dlw_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE dlw_system REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE dlw_login_manager REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
