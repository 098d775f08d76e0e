//! Role-based access control: roles grant `resource:action` permissions
//! (with inheritance), and route rules map a method and a path template to
//! the permission they require. Deny by default.
//!
//! Everything is compiled once at start: role inheritance is flattened into a
//! set of permission ids per role (cycles and unknown roles are errors), and
//! the rules into a segment trie. A check walks the request path's segments
//! (literal, then `{param}`, then a trailing `*rest`) and tests set
//! membership for the caller's roles, so its cost depends on the path depth
//! and the number of roles the caller holds, never on the number of rules.
//!
//! ```
//! use gateway_mw::rbac::{Decision, PolicyConfig, RouteRule, RoleDef};
//!
//! let policy = PolicyConfig::default()
//!     .role("reader", RoleDef::new(["orders:read"]))
//!     .role("admin", RoleDef::new(["orders:write"]).inherits(["reader"]))
//!     .rule(RouteRule::new("GET", "/v1/orders/{id}", "orders:read"))
//!     .rule(RouteRule::new("POST", "/v1/orders", "orders:write"))
//!     .compile()
//!     .unwrap();
//!
//! assert!(matches!(policy.check("GET", "/v1/orders/42", &["admin"]), Decision::Allow { .. }));
//! assert!(matches!(policy.check("POST", "/v1/orders", &["reader"]), Decision::Forbidden { .. }));
//! assert!(matches!(policy.check("DELETE", "/v1/orders/42", &["admin"]), Decision::NoRoute));
//! ```

use std::collections::{HashMap, HashSet};

pub use crate::router::MAX_SEGMENTS;
use crate::router::{RouteError, Router};

/// Errors in a policy, found at compile time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A permission is not `resource:action`.
    #[error("permission {0:?} is not resource:action")]
    InvalidPermission(String),
    /// A role inherits a role that is not defined.
    #[error("role {role:?} inherits unknown role {parent:?}")]
    UnknownRole {
        /// The inheriting role.
        role: String,
        /// The missing parent.
        parent: String,
    },
    /// Roles inherit from each other in a cycle.
    #[error("role inheritance cycle through {0:?}")]
    InheritanceCycle(String),
    /// A path template is invalid.
    #[error("route {template:?}: {reason}")]
    InvalidTemplate {
        /// The template.
        template: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two rules have the same method and template.
    #[error("duplicate rule {method} {template}")]
    DuplicateRule {
        /// The method.
        method: String,
        /// The template.
        template: String,
    },
}

/// One role: its own permissions and the roles it inherits from.
#[derive(Debug, Clone, Default)]
pub struct RoleDef {
    permissions: Vec<String>,
    inherits: Vec<String>,
}

impl RoleDef {
    /// A role granting `permissions`.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(permissions: I) -> RoleDef {
        RoleDef {
            permissions: permissions.into_iter().map(Into::into).collect(),
            inherits: Vec::new(),
        }
    }

    /// Also grants every permission of `parents` (transitively).
    pub fn inherits<I: IntoIterator<Item = S>, S: Into<String>>(mut self, parents: I) -> RoleDef {
        self.inherits.extend(parents.into_iter().map(Into::into));
        self
    }
}

/// A route rule: `method` (or `*` for any) and a path template.
///
/// Templates are `/`-separated: literal segments, `{name}` for exactly one
/// segment, and a final `*name` for the rest of the path (one or more
/// segments). A literal beats `{param}`, which beats `*rest`.
#[derive(Debug, Clone)]
pub struct RouteRule {
    method: String,
    template: String,
    permission: String,
}

impl RouteRule {
    /// `method` on `template` requires `permission`.
    pub fn new(
        method: impl Into<String>,
        template: impl Into<String>,
        permission: impl Into<String>,
    ) -> RouteRule {
        RouteRule {
            method: method.into().to_ascii_uppercase(),
            template: template.into(),
            permission: permission.into(),
        }
    }
}

/// Roles and rules, before compilation.
#[derive(Debug, Clone, Default)]
pub struct PolicyConfig {
    roles: HashMap<String, RoleDef>,
    rules: Vec<RouteRule>,
}

impl PolicyConfig {
    /// Defines (or replaces) a role.
    pub fn role(mut self, name: impl Into<String>, def: RoleDef) -> Self {
        self.roles.insert(name.into(), def);
        self
    }

    /// Adds a route rule.
    pub fn rule(mut self, rule: RouteRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Validates and compiles the policy.
    pub fn compile(&self) -> Result<Policy, PolicyError> {
        let mut permissions = Interner::default();
        for def in self.roles.values() {
            for p in &def.permissions {
                permissions.intern(p)?;
            }
        }
        let mut roles = HashMap::with_capacity(self.roles.len());
        for name in self.roles.keys() {
            let mut granted = HashSet::new();
            let mut path = Vec::new();
            self.collect(name, &mut granted, &mut path, &permissions)?;
            roles.insert(name.clone(), granted);
        }
        let mut routes = Router::new();
        for rule in &self.rules {
            let permission = permissions.intern(&rule.permission)?;
            routes
                .insert(&rule.method, &rule.template, permission)
                .map_err(|e| match e {
                    RouteError::InvalidTemplate { template, reason } => {
                        PolicyError::InvalidTemplate { template, reason }
                    }
                    RouteError::Duplicate { method, template } => {
                        PolicyError::DuplicateRule { method, template }
                    }
                })?;
        }
        Ok(Policy {
            roles,
            routes,
            permission_names: permissions.names,
            rules: self.rules.len(),
        })
    }

    fn collect(
        &self,
        role: &str,
        granted: &mut HashSet<u32>,
        path: &mut Vec<String>,
        permissions: &Interner,
    ) -> Result<(), PolicyError> {
        if path.iter().any(|r| r == role) {
            return Err(PolicyError::InheritanceCycle(role.to_owned()));
        }
        let def = &self.roles[role];
        for p in &def.permissions {
            granted.insert(permissions.ids[p.as_str()]);
        }
        path.push(role.to_owned());
        for parent in &def.inherits {
            if !self.roles.contains_key(parent) {
                return Err(PolicyError::UnknownRole {
                    role: role.to_owned(),
                    parent: parent.clone(),
                });
            }
            self.collect(parent, granted, path, permissions)?;
        }
        path.pop();
        Ok(())
    }
}

#[derive(Default, Debug)]
struct Interner {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    fn intern(&mut self, permission: &str) -> Result<u32, PolicyError> {
        if let Some(&id) = self.ids.get(permission) {
            return Ok(id);
        }
        let valid = permission
            .split_once(':')
            .is_some_and(|(r, a)| !r.is_empty() && !a.is_empty() && !a.contains(':'));
        if !valid {
            return Err(PolicyError::InvalidPermission(permission.to_owned()));
        }
        let id = self.names.len() as u32;
        self.names.push(permission.to_owned());
        self.ids.insert(permission.to_owned(), id);
        Ok(id)
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A rule matched and one of the roles grants its permission.
    Allow {
        /// The matched template (a low-cardinality label for metrics).
        route: String,
        /// The permission that was required.
        permission: String,
    },
    /// A rule matched but no role grants its permission (HTTP 403).
    Forbidden {
        /// The matched template.
        route: String,
        /// The permission that was missing.
        permission: String,
    },
    /// No rule matches the method and path: denied by default.
    NoRoute,
}

/// A compiled policy; cheap to share (`Arc`) and check from many threads.
#[derive(Debug)]
pub struct Policy {
    roles: HashMap<String, HashSet<u32>>,
    routes: Router<u32>,
    permission_names: Vec<String>,
    rules: usize,
}

impl Policy {
    /// Whether a caller holding `roles` may call `method` on `path`.
    /// `path` must be the output of [`crate::router::normalize_path`] (the
    /// HTTP layers normalize before they check): literal segments are
    /// compared after one percent-decoding, but dot segments, `;` and
    /// encoded slashes are only refused by the normalizer. Unknown roles
    /// grant nothing.
    pub fn check<R: AsRef<str>>(&self, method: &str, path: &str, roles: &[R]) -> Decision {
        let Some(route) = self.routes.find(method, path) else {
            return Decision::NoRoute;
        };
        let (permission, template) = (route.value, route.template);
        let name = self.permission_names[*permission as usize].clone();
        let granted = roles
            .iter()
            .filter_map(|r| self.roles.get(r.as_ref()))
            .any(|set| set.contains(permission));
        if granted {
            Decision::Allow {
                route: template.to_owned(),
                permission: name,
            }
        } else {
            Decision::Forbidden {
                route: template.to_owned(),
                permission: name,
            }
        }
    }

    /// Whether `roles` grant `permission` (no route involved).
    pub fn grants<R: AsRef<str>>(&self, roles: &[R], permission: &str) -> bool {
        let Some(id) = self.permission_names.iter().position(|p| p == permission) else {
            return false;
        };
        roles
            .iter()
            .filter_map(|r| self.roles.get(r.as_ref()))
            .any(|set| set.contains(&(id as u32)))
    }

    /// Number of route rules compiled.
    pub fn rule_count(&self) -> usize {
        self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        PolicyConfig::default()
            .role("viewer", RoleDef::new(["orders:read", "files:read"]))
            .role("clerk", RoleDef::new(["orders:write"]).inherits(["viewer"]))
            .role("admin", RoleDef::new(["admin:all"]).inherits(["clerk"]))
            .rule(RouteRule::new("GET", "/v1/orders", "orders:read"))
            .rule(RouteRule::new("GET", "/v1/orders/{id}", "orders:read"))
            .rule(RouteRule::new("POST", "/v1/orders", "orders:write"))
            .rule(RouteRule::new("GET", "/v1/orders/export", "admin:all"))
            .rule(RouteRule::new("GET", "/v1/files/*path", "files:read"))
            .rule(RouteRule::new("*", "/admin/*rest", "admin:all"))
            .rule(RouteRule::new("GET", "/", "orders:read"))
            .compile()
            .unwrap()
    }

    fn allowed(d: &Decision) -> bool {
        matches!(d, Decision::Allow { .. })
    }

    #[test]
    fn inheritance_is_transitive() {
        let p = policy();
        assert!(p.grants(&["admin"], "orders:read"));
        assert!(p.grants(&["clerk"], "files:read"));
        assert!(!p.grants(&["viewer"], "orders:write"));
        assert!(!p.grants(&["nobody"], "orders:read"));
    }

    #[test]
    fn routes_match_literal_then_param_then_rest() {
        let p = policy();
        assert_eq!(
            p.check("GET", "/v1/orders/export", &["viewer"]),
            Decision::Forbidden {
                route: "/v1/orders/export".into(),
                permission: "admin:all".into()
            }
        );
        assert_eq!(
            p.check("GET", "/v1/orders/7", &["viewer"]),
            Decision::Allow {
                route: "/v1/orders/{id}".into(),
                permission: "orders:read".into()
            }
        );
        assert!(allowed(&p.check("GET", "/v1/files/a/b/c.txt", &["viewer"])));
        assert_eq!(
            p.check("GET", "/v1/files", &["viewer"]),
            Decision::NoRoute,
            "*rest needs a segment"
        );
        assert!(allowed(&p.check("DELETE", "/admin/users/1", &["admin"])));
        assert!(allowed(&p.check("GET", "/", &["viewer"])));
    }

    #[test]
    fn deny_by_default() {
        let p = policy();
        assert_eq!(p.check("PUT", "/v1/orders", &["admin"]), Decision::NoRoute);
        assert_eq!(p.check("GET", "/v2/orders", &["admin"]), Decision::NoRoute);
        assert_eq!(p.check("GET", "v1/orders", &["admin"]), Decision::NoRoute);
        assert_eq!(
            p.check("GET", "/v1/orders/7/extra", &["admin"]),
            Decision::NoRoute
        );
        assert!(matches!(
            p.check("POST", "/v1/orders", &["viewer"]),
            Decision::Forbidden { .. }
        ));
        assert!(matches!(
            p.check("GET", "/v1/orders", &[] as &[&str]),
            Decision::Forbidden { .. }
        ));
        let deep = "/x".repeat(MAX_SEGMENTS + 1);
        assert_eq!(p.check("GET", &deep, &["admin"]), Decision::NoRoute);
    }

    #[test]
    fn invalid_policies_are_refused() {
        let base = || PolicyConfig::default().role("a", RoleDef::new(["x:y"]));
        assert!(matches!(
            base().role("b", RoleDef::new(["nocolon"])).compile(),
            Err(PolicyError::InvalidPermission(_))
        ));
        assert!(matches!(
            base().role("b", RoleDef::new([":y"])).compile(),
            Err(PolicyError::InvalidPermission(_))
        ));
        assert!(matches!(
            base()
                .role("b", RoleDef::new(["x:y"]).inherits(["ghost"]))
                .compile(),
            Err(PolicyError::UnknownRole { .. })
        ));
        let cycle = base()
            .role("b", RoleDef::new(["x:y"]).inherits(["c"]))
            .role("c", RoleDef::new(["x:y"]).inherits(["b"]))
            .compile();
        assert!(matches!(cycle, Err(PolicyError::InheritanceCycle(_))));
        for bad in [
            "no-slash",
            "/a//b",
            "/a/*",
            "/a/*rest/b",
            "/a/{x",
            "/a/b{x}",
            "/a/{}",
        ] {
            let r = base().rule(RouteRule::new("GET", bad, "x:y")).compile();
            assert!(
                matches!(r, Err(PolicyError::InvalidTemplate { .. })),
                "{bad}"
            );
        }
        let dup = base()
            .rule(RouteRule::new("GET", "/a/{x}", "x:y"))
            .rule(RouteRule::new("get", "/a/{y}", "x:y"))
            .compile();
        assert!(matches!(dup, Err(PolicyError::DuplicateRule { .. })));
    }

    #[test]
    fn ten_thousand_rules_compile_and_check() {
        let mut config = PolicyConfig::default().role("r", RoleDef::new(["svc:read"]));
        for i in 0..10_000 {
            config = config.rule(RouteRule::new(
                "GET",
                format!("/svc{}/items/{{id}}/sub{}", i % 100, i / 100),
                "svc:read",
            ));
        }
        let policy = config.compile().unwrap();
        assert_eq!(policy.rule_count(), 10_000);
        assert!(allowed(&policy.check(
            "GET",
            "/svc42/items/9/sub99",
            &["r"]
        )));
        assert_eq!(
            policy.check("GET", "/svc42/items/9/sub100", &["r"]),
            Decision::NoRoute
        );
    }
}
