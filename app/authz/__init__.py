"""Role-based access control: a casbin model (model.conf) with the built-in policy in this
package and extra grants read from dlw.casbin_rule, evaluated by a PolicyIndex (pycasbin's
decisions, O(1) per changed rule) and updated on NOTIFY."""
