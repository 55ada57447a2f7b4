// Every field attribute on a named struct; a local state type inside a function.
use std::collections::{HashMap, HashSet};

use ms2m_core::ServiceState;

type Tags = HashSet<String>;

struct Compiled(usize);

fn placeholder() -> Compiled {
    Compiled(0)
}

#[derive(ServiceState)]
#[state(version = 1)]
struct Index {
    words: HashMap<String, u32>,
    #[state(unordered)]
    tags: Tags,
    #[state(skip)]
    hits: u64,
    #[state(skip, rebuild = Index::by_count)]
    by_count: Vec<String>,
    #[state(skip, default = placeholder, rebuild = Self::compile)]
    compiled: Compiled,
}

impl Index {
    fn by_count(&self) -> Vec<String> {
        let mut v: Vec<_> = self.words.keys().cloned().collect();
        v.sort_by_key(|w| self.words[w]);
        v
    }

    fn compile(&self) -> Compiled {
        Compiled(self.words.len())
    }
}

fn main() {
    // `Self` in a field type means the state, not a generated mirror.
    #[derive(serde::Serialize, serde::Deserialize, ServiceState)]
    #[state(version = 4)]
    struct Local(Option<Box<Self>>);

    let i = Index {
        words: [("a".into(), 2), ("b".into(), 1)].into(),
        tags: Tags::new(),
        hits: 7,
        by_count: vec![],
        compiled: Compiled(0),
    };
    let back = Index::restore(1, &i.snapshot().unwrap()).unwrap();
    assert_eq!(back.by_count, ["b", "a"]);
    assert_eq!((back.hits, back.compiled.0), (0, 2));
    assert_eq!(back.digest(), i.digest());

    let l = Local(Some(Box::new(Local(None))));
    assert!(Local::restore(4, &l.snapshot().unwrap()).unwrap().0.is_some());
}
