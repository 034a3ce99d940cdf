//! Channels and who listens: the subscriptions live here, in a side table by connection slot,
//! not in the connections' state (a client that never subscribes pays 8 bytes for its slot).

use std::collections::BTreeSet;

use sockman::ConnId;

/// The channels of one subscribed connection, in order.
type Channels = BTreeSet<Box<[u8]>>;

/// Every channel with its subscribers, and every subscriber's channels.
#[derive(Debug, Default)]
pub struct PubSub {
    channels: hashbrown::HashMap<Box<[u8]>, Vec<ConnId>>,
    /// By connection slot (`ConnId::key`): the channels of a subscribed connection, in order.
    clients: Vec<Option<Box<Channels>>>,
}

impl PubSub {
    /// How many channels connection `id` is subscribed to (0: not in subscribed mode).
    pub fn count(&self, id: ConnId) -> usize {
        match self.clients.get(id.key()) {
            Some(Some(set)) => set.len(),
            _ => 0,
        }
    }

    /// Subscribes `id` to `channel`; returns its count of subscriptions.
    pub fn subscribe(&mut self, id: ConnId, channel: &[u8]) -> usize {
        let key = id.key();
        if self.clients.len() <= key {
            self.clients.resize_with(key + 1, || None);
        }
        let set = self.clients[key].get_or_insert_with(Default::default);
        if !set.contains(channel) {
            set.insert(channel.into());
            self.channels
                .raw_entry_mut()
                .from_key(channel)
                .or_insert_with(|| (channel.into(), Vec::new()))
                .1
                .push(id);
        }
        set.len()
    }

    /// Unsubscribes `id` from `channel` (if it was); returns its count of subscriptions left.
    pub fn unsubscribe(&mut self, id: ConnId, channel: &[u8]) -> usize {
        let Some(Some(set)) = self.clients.get_mut(id.key()) else {
            return 0;
        };
        if set.remove(channel) {
            Self::leave(&mut self.channels, id, channel);
        }
        let left = set.len();
        if left == 0 {
            self.clients[id.key()] = None;
        }
        left
    }

    /// Unsubscribes `id` from everything; returns its channels, in order.
    pub fn unsubscribe_all(&mut self, id: ConnId) -> Vec<Box<[u8]>> {
        let Some(set) = self.clients.get_mut(id.key()).and_then(Option::take) else {
            return Vec::new();
        };
        let set = *set;
        for channel in &set {
            Self::leave(&mut self.channels, id, channel);
        }
        set.into_iter().collect()
    }

    fn leave(channels: &mut hashbrown::HashMap<Box<[u8]>, Vec<ConnId>>, id: ConnId, ch: &[u8]) {
        if let Some(ids) = channels.get_mut(ch) {
            if let Some(at) = ids.iter().position(|&i| i == id) {
                ids.swap_remove(at);
            }
            if ids.is_empty() {
                channels.remove(ch);
            }
        }
    }

    /// The subscribers of `channel`.
    pub fn subscribers(&self, channel: &[u8]) -> &[ConnId] {
        self.channels.get(channel).map_or(&[], Vec::as_slice)
    }

    /// Channels with at least one subscriber.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }
}
