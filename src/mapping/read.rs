//! Reads only what the mappings need from a record value, in one pass, without building the
//! whole JSON tree.
//!
//! At compile time every JSON pointer a mapping uses goes into a trie. A pointer that is a prefix
//! of another is *materialised*: its whole value is built once (a [`Val`]), and the
//! longer pointers are resolved inside it afterwards. Everything the trie does not name is
//! skipped by the parser (`IgnoredAny`), which checks its syntax and allocates nothing.

use super::value::Val;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;

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
    pub fn read<'t>(&self, text: &'t str, slots: &mut [Option<Val<'t>>]) -> Result<bool, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let is_object = NodeSeed {
            plan: self,
            node: 0,
            slots,
        }
        .deserialize(&mut de)?;
        de.end()?;
        Ok(is_object)
    }

    /// The value at `place` after [`Plan::read`].
    pub fn get<'v, 't>(slots: &'v [Option<Val<'t>>], place: &Place) -> Option<&'v Val<'t>> {
        lookup(&place.rest, slots[place.slot].as_ref()?)
    }
}

struct NodeSeed<'p, 's, 't> {
    plan: &'p Plan,
    node: usize,
    slots: &'s mut [Option<Val<'t>>],
}

impl<'t> DeserializeSeed<'t> for NodeSeed<'_, '_, 't> {
    /// Whether the value was an object.
    type Value = bool;

    fn deserialize<D: de::Deserializer<'t>>(self, d: D) -> Result<bool, D::Error> {
        if let Some(slot) = self.plan.nodes[self.node].slot {
            let v = Val::deserialize(d)?;
            let is_object = matches!(v, Val::Obj(_));
            self.slots[slot] = Some(v);
            return Ok(is_object);
        }
        d.deserialize_any(self)
    }
}

impl<'t> Visitor<'t> for NodeSeed<'_, '_, 't> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'t>>(self, mut map: A) -> Result<bool, A::Error> {
        let children = &self.plan.nodes[self.node].children;
        while let Some(child) = map.next_key_seed(KeySeed(children))? {
            match child {
                Some(node) => {
                    map.next_value_seed(NodeSeed {
                        plan: self.plan,
                        node,
                        slots: &mut *self.slots,
                    })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(true)
    }

    fn visit_seq<A: SeqAccess<'t>>(self, mut seq: A) -> Result<bool, A::Error> {
        let children = &self.plan.nodes[self.node].children;
        let mut i = 0usize;
        loop {
            let child = children.iter().find(|c| c.1 == Some(i)).map(|c| c.2);
            let more = match child {
                Some(node) => seq
                    .next_element_seed(NodeSeed {
                        plan: self.plan,
                        node,
                        slots: &mut *self.slots,
                    })?
                    .is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(false);
            }
            i += 1;
        }
    }

    // Scalars where the plan expected a container: the pointers below simply do not resolve.
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_none<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// Matches an object key against a node's children without allocating it.
struct KeySeed<'p>(&'p [(String, Option<usize>, usize)]);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, k: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().find(|c| c.0 == k).map(|c| c.2))
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
        let full: Val = serde_json::from_str(text).unwrap();
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
