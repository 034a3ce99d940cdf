//! TEMPORARY naive stand-in (being replaced by the hashed wheel).
#![allow(missing_docs)]
pub type Tick = u64;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry {
    pub key: u32,
    pub gen: u32,
    pub when: Tick,
}
#[derive(Debug, Default)]
pub struct Wheel {
    v: Vec<Entry>,
    elapsed: Tick,
}
impl Wheel {
    pub fn for_span(_span: Tick) -> Wheel {
        Wheel::default()
    }
    pub fn insert(&mut self, key: u32, gen: u32, when: Tick) {
        self.v.push(Entry { key, gen, when })
    }
    pub fn advance(&mut self, now: Tick, budget: usize, out: &mut Vec<Entry>) -> bool {
        let mut n = 0;
        let mut i = 0;
        while i < self.v.len() {
            if self.v[i].when <= now {
                if n == budget {
                    return true;
                }
                out.push(self.v.swap_remove(i));
                n += 1
            } else {
                i += 1
            }
        }
        self.elapsed = now + 1;
        false
    }
    pub fn next_deadline(&self) -> Option<Tick> {
        self.v.iter().map(|e| e.when.max(self.elapsed)).min()
    }
}
