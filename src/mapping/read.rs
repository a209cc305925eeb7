//! Reads only what the mappings need from a record value, in one pass, without building the
//! whole JSON tree.
//!
//! At compile time every JSON pointer a mapping uses goes into a trie. A pointer that is a prefix
//! of another is *materialised*: its whole value is built once (a [`Val`]), and the
//! longer pointers are resolved inside it afterwards. Everything the trie does not name is
//! skipped by the reader ([`Scanner::skip`]), which checks its syntax and allocates nothing.

use super::json::{JsonError, Scanner};
use super::value::Val;

/// A parsed JSON pointer (RFC 6901): its unescaped tokens. Empty for the whole value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer(pub Vec<String>);

impl Pointer {
    /// Parses `"/a/b/0"`; `""` is the whole value.
    pub fn parse(s: &str) -> Result<Pointer, String> {
        if s.is_empty() {
            return Ok(Pointer(Vec::new()));
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!(
                "`{s}` is not a source: write a JSON pointer such as \"/player/id\", or one of `key`, \
                 `header:NAME`, `topic`, `partition`, `offset`, `timestamp`"
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut tok = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => tok.push('~'),
                        Some('1') => tok.push('/'),
                        _ => return Err(format!("`{s}`: `~` must be followed by 0 or 1 in a JSON pointer")),
                    }
                } else {
                    tok.push(c);
                }
            }
            tokens.push(tok);
        }
        Ok(Pointer(tokens))
    }

    /// Looks the pointer up in `v` (array elements by decimal index).
    #[cfg(test)]
    pub fn lookup<'v, 'a>(&self, v: &'v Val<'a>) -> Option<&'v Val<'a>> {
        lookup(&self.0, v)
    }
}

fn lookup<'v, 'a>(tokens: &[String], mut v: &'v Val<'a>) -> Option<&'v Val<'a>> {
    for t in tokens {
        v = match v {
            Val::Obj(_) => v.get(t)?,
            Val::Arr(a) => a.get(array_index(t)?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// `"0"`, `"12"`: a JSON pointer array index (no sign, no leading zeros).
fn array_index(t: &str) -> Option<usize> {
    if t.len() > 1 && t.starts_with('0') {
        return None;
    }
    t.parse().ok()
}

/// Where a compiled pointer's value is found after reading: a slot, and a rest inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub slot: usize,
    pub rest: Vec<String>,
}

#[derive(Debug, Default)]
struct Node {
    slot: Option<usize>,
    children: Vec<(String, Option<usize>, usize)>,
}

/// The pointers of one mapping, compiled into a reading plan.
#[derive(Debug)]
pub struct Plan {
    nodes: Vec<Node>,
    slots: usize,
}

impl Plan {
    /// Builds the plan for `pointers` and returns where each one is found, in the same order.
    pub fn build(pointers: &[Pointer]) -> (Plan, Vec<Place>) {
        let mut order: Vec<usize> = (0..pointers.len()).collect();
        order.sort_by_key(|&i| pointers[i].0.len());
        let mut plan = Plan {
            nodes: vec![Node::default()],
            slots: 0,
        };
        let mut places = vec![None; pointers.len()];
        for i in order {
            let tokens = &pointers[i].0;
            let mut node = 0;
            let mut found = None;
            for (depth, t) in tokens.iter().enumerate() {
                if let Some(slot) = plan.nodes[node].slot {
                    found = Some(Place {
                        slot,
                        rest: tokens[depth..].to_vec(),
                    });
                    break;
                }
                node = match plan.nodes[node].children.iter().find(|c| &c.0 == t) {
                    Some(c) => c.2,
                    None => {
                        plan.nodes.push(Node::default());
                        let id = plan.nodes.len() - 1;
                        plan.nodes[node].children.push((t.clone(), array_index(t), id));
                        id
                    }
                };
            }
            let place = match found {
                Some(p) => p,
                None => {
                    let slot = match plan.nodes[node].slot {
                        Some(s) => s,
                        None => {
                            plan.nodes[node].slot = Some(plan.slots);
                            plan.slots += 1;
                            plan.slots - 1
                        }
                    };
                    Place { slot, rest: Vec::new() }
                }
            };
            places[i] = Some(place);
        }
        // A node that became a slot after its children were added (a shorter pointer sorts
        // first, so this cannot happen) would leave children unread.
        debug_assert!(plan.nodes.iter().all(|n| n.slot.is_none() || n.children.is_empty()));
        (
            plan,
            places.into_iter().map(|p| p.expect("every pointer placed")).collect(),
        )
    }

    pub fn slot_count(&self) -> usize {
        self.slots
    }

    /// Reads `text` (one JSON document) into `slots`. Returns whether the top level is an object.
    ///
    /// Errors: the text is not JSON (RFC 8259), a value that is built nests too deeply or holds a
    /// number that overflows a binary64, or an object anywhere has a key twice (issue 16).
    pub fn read<'t>(&self, text: &'t str, slots: &mut [Option<Val<'t>>]) -> Result<bool, JsonError> {
        thread_local! {
            /// The reader's key list, kept per thread so that a record's read allocates nothing.
            static KEYS: std::cell::Cell<Vec<super::json::NotedKey>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut s = Scanner::with_keys(text, KEYS.take());
        let read = self
            .node(&mut s, 0, 0, slots)
            .and_then(|is_object| s.end().map(|()| is_object));
        KEYS.set(s.into_keys());
        read
    }

    /// Reads the value at the scanner into `node`'s slot, or into its children's, skipping what
    /// no pointer names.
    fn node<'t>(
        &self,
        s: &mut Scanner<'t>,
        node: usize,
        depth: usize,
        slots: &mut [Option<Val<'t>>],
    ) -> Result<bool, JsonError> {
        let n = &self.nodes[node];
        if let Some(slot) = n.slot {
            // Strings, the usual leaves, without the round trip through `value`.
            let v = match s.peek() {
                Some(b'"') => Val::Str(s.string()?),
                _ => s.value(depth)?,
            };
            let is_object = matches!(v, Val::Obj(_));
            slots[slot] = Some(v);
            return Ok(is_object);
        }
        match s.peek() {
            Some(b'{') => {
                s.bump();
                if s.eat(b'}') {
                    return Ok(true);
                }
                let keys = s.open_keys();
                loop {
                    let k = s.noted_key()?;
                    match n.children.iter().find(|c| c.0 == *k) {
                        Some(c) => {
                            self.node(s, c.2, depth + 1, slots)?;
                        }
                        None => s.skip()?,
                    }
                    if !s.next_member(b'}')? {
                        s.close_keys(keys)?;
                        return Ok(true);
                    }
                }
            }
            Some(b'[') => {
                s.bump();
                if s.eat(b']') {
                    return Ok(false);
                }
                let mut i = 0usize;
                loop {
                    match n.children.iter().find(|c| c.1 == Some(i)) {
                        Some(c) => {
                            self.node(s, c.2, depth + 1, slots)?;
                        }
                        None => s.skip()?,
                    }
                    if !s.next_member(b']')? {
                        return Ok(false);
                    }
                    i += 1;
                }
            }
            // Scalars where the plan expected a container: the pointers below do not resolve.
            _ => s.skip().map(|()| false),
        }
    }

    /// The value at `place` after [`Plan::read`].
    pub fn get<'v, 't>(slots: &'v [Option<Val<'t>>], place: &Place) -> Option<&'v Val<'t>> {
        lookup(&place.rest, slots[place.slot].as_ref()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ptrs(s: &[&str]) -> Vec<Pointer> {
        s.iter().map(|p| Pointer::parse(p).unwrap()).collect()
    }

    #[test]
    fn pointer_syntax() {
        assert_eq!(Pointer::parse("/a~1b/c~0d/0").unwrap().0, ["a/b", "c~d", "0"]);
        assert!(Pointer::parse("a/b").is_err());
        assert!(Pointer::parse("/a~2").is_err());
        assert_eq!(Pointer::parse("").unwrap().0, Vec::<String>::new());
    }

    #[test]
    fn reads_only_the_planned_paths_and_agrees_with_a_full_parse() {
        let p = ptrs(&["/player/id", "/items/1/sku", "/meta", "/meta/x", "/missing/y", "/a\"b"]);
        let (plan, places) = Plan::build(&p);
        let text = r#"{"player":{"id":"u1","name":"n"},"items":[{"sku":"a"},{"sku":"b"}],
                      "meta":{"x":1,"y":[1,2]},"other":{"deep":[[[1]]]},"missing":3,"a\"b":"esc"}"#;
        let mut slots = vec![None; plan.slot_count()];
        assert!(plan.read(text, &mut slots).unwrap());
        let full = super::super::json::parse(text).unwrap();
        for (ptr, place) in p.iter().zip(&places) {
            assert_eq!(Plan::get(&slots, place), ptr.lookup(&full), "{ptr:?}");
        }
        assert_eq!(Plan::get(&slots, &places[0]), Some(&Val::from_json(json!("u1"))));
        assert_eq!(places[3].slot, places[2].slot, "/meta/x is read inside /meta");
    }

    #[test]
    fn rejects_bad_json_and_reports_non_objects() {
        let (plan, _) = Plan::build(&ptrs(&["/a"]));
        let read = |text: &str| plan.read(text, &mut vec![None; plan.slot_count()]);
        assert!(read("{\"a\":1").is_err());
        assert!(read("{\"a\":1} x").is_err());
        assert!(read("{\"b\":[1,}").is_err());
        assert!(!read("[1,2]").unwrap());
        assert!(!read("\"s\"").unwrap());
        // Deep nesting: skipped without recursion where unread, refused (recursion limit) where read.
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(read(&format!("{{\"b\":{deep}}}")).is_ok());
        assert!(read(&format!("{{\"a\":{deep}}}")).is_err());
    }
}
