"""Role-based access control: casbin with the built-in policy in this package and extra
grants read from dlw.casbin_rule, reloaded on NOTIFY."""
