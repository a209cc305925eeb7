//! The escape hatch: a jq expression (run by jaq) for what the declarative options cannot say.
//!
//! Expressions are compiled once at start-up. Each run converts its input to jaq's value type and
//! its first output back, so an expression costs microseconds: fine for the rare field, not for
//! every field.

use super::json;
use super::value::Val;
use jaq_core::data::JustLut;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Native, Vars};
use jaq_json::Val as JVal;

type Filter = jaq_core::compile::Filter<Native<JustLut<JVal>>>;

/// Native jq functions a mapping may not call, and the definitions built on them.
const DENIED: &[&str] = &["env", "debug_empty", "stderr_empty"];
const DENIED_DEFS: &[&str] = &["debug", "stderr", "halt_error"];

/// A compiled jq filter.
pub struct Expr {
    source: String,
    filter: Filter,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl Expr {
    /// Compiles `code`; the error says what is wrong with it.
    pub fn compile(code: &str) -> Result<Expr, String> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs())
            .filter(|d| !DENIED_DEFS.contains(&d.name));
        // No `env`: the API key may be in the environment, and an expression's result is sent
        // to the API. No `debug`/`stderr` output either: records would bypass the logging.
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs())
            .filter(|(name, _, _)| !DENIED.contains(name));
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader.load(&arena, File { code, path: () }).map_err(|errs| {
            let parts: Vec<String> = errs
                .into_iter()
                .map(|(_file, e)| match e {
                    jaq_core::load::Error::Io(v) => format!("cannot load {:?}", v),
                    jaq_core::load::Error::Lex(v) => {
                        format!("cannot read the expression near {:?}", v.first().map(|(_, at)| *at))
                    }
                    jaq_core::load::Error::Parse(v) => {
                        format!("cannot parse the expression near {:?}", v.first().map(|(_, at)| *at))
                    }
                })
                .collect();
            parts.join("; ")
        })?;
        let filter = Compiler::default().with_funs(funs).compile(modules).map_err(|errs| {
            let parts: Vec<String> = errs
                .into_iter()
                .flat_map(|(_file, e)| e.into_iter().map(|(name, what)| format!("undefined {what:?} `{name}`")))
                .collect();
            parts.join("; ")
        })?;
        Ok(Expr {
            source: code.to_string(),
            filter,
        })
    }

    /// Runs the filter on `input` and returns its first output (`None` when it yields nothing or
    /// `null`), or the error it raised.
    ///
    /// Values cross to jaq and back as JSON text, read by jaq-json's reader and by the mapping's
    /// (`json`): both keep a number they cannot hold as an integer as its decimal text, so a number
    /// the expression passes through keeps its digits (issue 16); one it computes with is a
    /// binary64, as in jq.
    pub fn run(&self, input: &Val<'_>) -> Result<Option<Val<'static>>, String> {
        let input = jaq_json::read::parse_single(input.to_string().as_bytes())
            .map_err(|e| format!("cannot pass the input to the expression: {e}"))?;
        let ctx = Ctx::<JustLut<JVal>>::new(&self.filter.lut, Vars::new([]));
        let mut out = self.filter.id.run((ctx, input));
        match out.next() {
            None => Ok(None),
            Some(Ok(v)) => {
                // jaq prints values as JSON; non-finite numbers print as `null`.
                let text = v.to_string();
                let v = json::parse(&text)
                    .map_err(|e| format!("the expression produced a value that is not JSON ({e})"))?
                    .into_owned();
                Ok(if v.is_null() { None } else { Some(v) })
            }
            Some(Err(exn)) => Err(match exn.get_err() {
                Ok(e) => format!("the expression failed: {}", truncate_owned(e.to_string())),
                // `halt` and friends: refuse rather than exit the process.
                Err(_) => "the expression called halt, which a mapping may not do".to_string(),
            }),
        }
    }
}

fn truncate_owned(s: String) -> String {
    crate::event::truncate(&s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn run(e: &Expr, input: Value) -> Result<Option<Value>, String> {
        let text = input.to_string();
        let v = json::parse(&text).unwrap();
        e.run(&v)
            .map(|o| o.map(|v| serde_json::from_str(&v.to_string()).unwrap()))
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Expr>();
    }

    #[test]
    fn runs_and_reports() {
        let e = Expr::compile(r#".a + "-" + (.b | tostring)"#).unwrap();
        assert_eq!(run(&e, json!({"a": "x", "b": 2})).unwrap(), Some(json!("x-2")));
        assert!(run(&e, json!({"a": {}, "b": 2})).unwrap_err().contains("cannot"));
        assert_eq!(run(&Expr::compile("empty").unwrap(), json!(1)).unwrap(), None);
        assert!(Expr::compile(".a +").is_err());
        assert!(Expr::compile("nosuchfn(1)").unwrap_err().contains("nosuchfn"));
        assert!(run(&Expr::compile("halt").unwrap(), json!(1)).is_err());
        for denied in ["env", "$ENV", "env.HOME", "debug", "stderr", "debug(1)"] {
            let compiled = Expr::compile(denied);
            assert!(
                compiled.is_err() || run(&compiled.unwrap(), json!(1)).is_err(),
                "`{denied}` must not run"
            );
        }
        assert!(run(&Expr::compile("error(\"boom\")").unwrap(), json!(1))
            .unwrap_err()
            .contains("boom"));
    }

    #[test]
    fn numbers_passed_through_keep_their_digits() {
        let text = r#"{"id":77012345678901234567890123,"amt":50.00,"small":9007199254740993}"#;
        let v = json::parse(text).unwrap();
        let out = |code: &str| Expr::compile(code).unwrap().run(&v).unwrap().unwrap().to_string();
        assert_eq!(out(".id"), "77012345678901234567890123");
        assert_eq!(out(".amt"), "50.00");
        assert_eq!(out(".small"), "9007199254740993");
        assert_eq!(out("[.id, .small]"), "[77012345678901234567890123,9007199254740993]");
        // Arithmetic is jq's: integers exact, fractions binary64.
        assert_eq!(out(".small + 1"), "9007199254740994");
    }
}
