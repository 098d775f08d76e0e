//! Route templates compiled into a segment trie, shared by authorization
//! (which permission a route needs) and validation (which limits a route
//! has).
//!
//! Templates are `/`-separated: literal segments, `{name}` for exactly one
//! segment, and a final `*name` for the rest of the path (one or more
//! segments). A literal beats `{param}`, which beats `*rest`; a method of `*`
//! matches any method not listed explicitly. Matching walks the path's
//! segments, so its cost depends on the path depth, never on the number of
//! routes.

use std::collections::HashMap;

/// The most path segments a template or a matched path may have.
pub const MAX_SEGMENTS: usize = 32;

/// Why a route could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The template is invalid.
    #[error("route {template:?}: {reason}")]
    InvalidTemplate {
        /// The template.
        template: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The method and template are already routed.
    #[error("duplicate route {method} {template}")]
    Duplicate {
        /// The method.
        method: String,
        /// The template.
        template: String,
    },
}

/// A matched route: its value and template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a, T> {
    /// What was routed.
    pub value: &'a T,
    /// The template that matched (a low-cardinality label).
    pub template: &'a str,
}

type Methods<T> = HashMap<String, (T, String)>;

#[derive(Debug)]
struct Node<T> {
    literals: HashMap<String, Node<T>>,
    param: Option<Box<Node<T>>>,
    /// Routes ending in `*rest` here.
    rest: Methods<T>,
    /// Routes ending exactly here.
    methods: Methods<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literals: HashMap::new(),
            param: None,
            rest: HashMap::new(),
            methods: HashMap::new(),
        }
    }
}

/// Method + path template → `T`.
#[derive(Debug)]
pub struct Router<T> {
    root: Node<T>,
    len: usize,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T> Router<T> {
    /// An empty router.
    pub fn new() -> Router<T> {
        Router::default()
    }

    /// Routes `method` (upper-cased; `*` for any) on `template` to `value`.
    pub fn insert(&mut self, method: &str, template: &str, value: T) -> Result<(), RouteError> {
        let invalid = |reason| RouteError::InvalidTemplate {
            template: template.to_owned(),
            reason,
        };
        let Some(rest) = template.strip_prefix('/') else {
            return Err(invalid("must start with /"));
        };
        let segments: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        if segments.len() > MAX_SEGMENTS {
            return Err(invalid("too many segments"));
        }
        let mut node = &mut self.root;
        for (i, segment) in segments.iter().enumerate() {
            if segment.is_empty() {
                return Err(invalid("empty segment"));
            }
            if let Some(name) = segment.strip_prefix('*') {
                if i + 1 != segments.len() || name.is_empty() {
                    return Err(invalid("*rest must be a named, final segment"));
                }
                insert_method(&mut node.rest, method, template, value)?;
                self.len += 1;
                return Ok(());
            }
            node = if segment.starts_with('{') {
                if !segment.ends_with('}') || segment.len() < 3 {
                    return Err(invalid("a parameter is written {name}"));
                }
                node.param.get_or_insert_with(Box::default)
            } else {
                if segment.contains(['{', '}', '*']) {
                    return Err(invalid(
                        "{, } and * are only allowed as whole parameter segments",
                    ));
                }
                node.literals.entry((*segment).to_owned()).or_default()
            };
        }
        insert_method(&mut node.methods, method, template, value)?;
        self.len += 1;
        Ok(())
    }

    /// The route for `method` on `path`, if any.
    pub fn find(&self, method: &str, path: &str) -> Option<Route<'_, T>> {
        let rest = path.strip_prefix('/')?;
        let mut buffer = [""; MAX_SEGMENTS];
        let mut count = 0;
        if !rest.is_empty() {
            for segment in rest.split('/') {
                if count == MAX_SEGMENTS {
                    return None;
                }
                buffer[count] = segment;
                count += 1;
            }
        }
        find(&self.root, &buffer[..count], method)
            .map(|(value, template)| Route { value, template })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn insert_method<T>(
    map: &mut Methods<T>,
    method: &str,
    template: &str,
    value: T,
) -> Result<(), RouteError> {
    let method = method.to_ascii_uppercase();
    if map.contains_key(&method) {
        return Err(RouteError::Duplicate {
            method,
            template: template.to_owned(),
        });
    }
    map.insert(method, (value, template.to_owned()));
    Ok(())
}

fn find<'a, T>(node: &'a Node<T>, segments: &[&str], method: &str) -> Option<(&'a T, &'a str)> {
    let lookup = |map: &'a Methods<T>| {
        map.get(method)
            .or_else(|| map.get("*"))
            .map(|(v, t)| (v, t.as_str()))
    };
    let Some((first, rest)) = segments.split_first() else {
        return lookup(&node.methods);
    };
    if let Some(found) = node
        .literals
        .get(*first)
        .and_then(|n| find(n, rest, method))
    {
        return Some(found);
    }
    if let Some(found) = node.param.as_ref().and_then(|n| find(n, rest, method)) {
        return Some(found);
    }
    lookup(&node.rest)
}
