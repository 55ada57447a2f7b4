//! Game sessions: a Flappy-Bird-like world per player.
//!
//! Each `Join` opens a session with a `board` of configurable size (the
//! level a player is on: it is what makes the state large, as in the
//! paper's evaluation); `Flap` and `Tick` move the bird with integer
//! physics; passing a pipe scores a point and emits a `ScoreChanged`
//! output; hitting the ground ends the session. A `Query` asks for a
//! player's score and is always answered: the demo and the benchmarks send
//! one per input tick so that outputs keep flowing at a steady rate (scores
//! alone are sparse and stop when the birds crash), which is what lets an
//! outside observer time the gaps in the output.
//!
//! # Two ways to hold the same state
//!
//! [`GameSessions`] keeps its sessions in a persistent map
//! (`imbl::HashMap`) and each level in shared bytes (`bytes::Bytes`), and
//! derives `#[state(freeze)]`: a snapshot clones the state in O(1) and
//! encodes the clone on another thread, so the apply loop pauses for
//! microseconds whatever the state's size. [`PlainGameSessions`] is the same
//! game over a `std::collections::HashMap` and `Vec<u8>` levels: its
//! snapshots encode on the apply loop, a pause that grows with the state
//! (the benchmark harness compares the two). Both digest alike.

use std::collections::HashMap;
use std::convert::Infallible;

use async_trait::async_trait;
use bytes::Bytes;
use ms2m_core::codec::Json;
use ms2m_core::{ApplyContext, ServiceState, StatefulService};
use serde::{Deserialize, Serialize};

/// An input event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GameEvent {
    /// A player starts a session whose level has `board_bytes` bytes.
    Join {
        /// Player id.
        player: u64,
        /// Size of the level data kept in the session.
        board_bytes: u32,
    },
    /// The player flaps: the bird goes up.
    Flap {
        /// Player id.
        player: u64,
    },
    /// One frame of time: gravity and scrolling.
    Tick {
        /// Player id.
        player: u64,
    },
    /// A client asks for the player's score: answered with a
    /// [`ScoreChanged`] carrying the current score (0 for no session).
    Query {
        /// Player id.
        player: u64,
    },
}

impl GameEvent {
    /// The player the event is about (the record key: one player's events
    /// stay on one partition, in order).
    pub fn player(&self) -> u64 {
        match *self {
            GameEvent::Join { player, .. }
            | GameEvent::Flap { player }
            | GameEvent::Tick { player }
            | GameEvent::Query { player } => player,
        }
    }
}

/// The output: a player's score changed, or the answer to a `Query`
/// (keyed by player).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreChanged {
    /// Player id.
    pub player: u64,
    /// New score.
    pub score: u64,
    /// Input partition of the event that caused it.
    pub partition: i32,
    /// Input offset of the event that caused it.
    pub offset: i64,
}

/// One player's session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Bird height.
    pub y: i32,
    /// Vertical speed.
    pub vy: i32,
    /// Horizontal distance travelled.
    pub x: u64,
    /// Pipes passed.
    pub score: u64,
    /// Whether the bird is still flying.
    pub alive: bool,
    /// Level data (deterministic bytes derived from the player id), never
    /// changed after the join: shared, so cloning a session is O(1).
    /// Stored as bytes, not as a sequence of numbers: encoding and
    /// digesting copy and hash it in bulk.
    pub board: Bytes,
}

/// The service state: every session, in a persistent map that freezes in
/// O(1) for snapshots (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, ServiceState)]
#[state(version = 1, freeze)]
pub struct GameSessions {
    /// Sessions by player id.
    pub sessions: imbl::HashMap<u64, Session>,
    /// Events applied.
    pub events: u64,
}

/// The same game over plain `std` collections: snapshots serialize on the
/// apply loop (see the module docs). Same name, snapshots and digests as
/// [`GameSessions`].
#[derive(Debug, Default, PartialEq, Eq, ServiceState)]
#[state(version = 1)]
pub struct PlainGameSessions {
    /// Sessions by player id.
    pub sessions: HashMap<u64, Session>,
    /// Events applied.
    pub events: u64,
}

/// The sessions map of either state.
pub trait SessionMap {
    /// The player's session.
    fn session(&self, player: u64) -> Option<&Session>;
    /// The player's session, to change.
    fn session_mut(&mut self, player: u64) -> Option<&mut Session>;
    /// Opens (or replaces) the player's session.
    fn open(&mut self, player: u64, session: Session);
}

impl SessionMap for HashMap<u64, Session> {
    fn session(&self, player: u64) -> Option<&Session> {
        self.get(&player)
    }
    fn session_mut(&mut self, player: u64) -> Option<&mut Session> {
        self.get_mut(&player)
    }
    fn open(&mut self, player: u64, session: Session) {
        self.insert(player, session);
    }
}

impl SessionMap for imbl::HashMap<u64, Session> {
    fn session(&self, player: u64) -> Option<&Session> {
        self.get(&player)
    }
    fn session_mut(&mut self, player: u64) -> Option<&mut Session> {
        self.get_mut(&player)
    }
    fn open(&mut self, player: u64, session: Session) {
        self.insert(player, session);
    }
}

const PIPE_EVERY: u64 = 8;
const CEILING: i32 = 100;

fn board(player: u64, bytes: u32) -> Bytes {
    // xorshift: deterministic, cheap, not compressible.
    let mut s = player.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..bytes)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// What one event does to the sessions; returns the new score when it changed.
/// Shared by the service and the reference fold: it is the game's rules.
pub fn play(sessions: &mut impl SessionMap, event: &GameEvent) -> Option<(u64, u64)> {
    match *event {
        GameEvent::Join { player, board_bytes } => {
            sessions.open(
                player,
                Session {
                    y: 50,
                    alive: true,
                    board: board(player, board_bytes),
                    ..Session::default()
                },
            );
            None
        }
        GameEvent::Flap { player } => {
            let s = sessions.session_mut(player).filter(|s| s.alive)?;
            s.vy = 6;
            None
        }
        GameEvent::Tick { player } => {
            let s = sessions.session_mut(player).filter(|s| s.alive)?;
            s.y = (s.y + s.vy).min(CEILING);
            s.vy -= 1;
            s.x += 1;
            if s.y <= 0 {
                s.alive = false;
                return None;
            }
            if s.x % PIPE_EVERY == 0 {
                s.score += 1;
                return Some((player, s.score));
            }
            None
        }
        GameEvent::Query { player } => Some((player, sessions.session(player).map_or(0, |s| s.score))),
    }
}

/// The service over either state (the game's rules are [`play`]).
macro_rules! game_service {
    ($state:ty) => {
        #[async_trait]
        impl StatefulService for $state {
            const NAME: &'static str = "game-sessions";
            type Message = GameEvent;
            type Format = Json;
            type Error = Infallible;

            async fn apply(&mut self, event: GameEvent, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
                self.events += 1;
                if let Some((player, score)) = play(&mut self.sessions, &event) {
                    let out = ScoreChanged {
                        player,
                        score,
                        partition: ctx.partition(),
                        offset: ctx.offset(),
                    };
                    ctx.emit_keyed(player.to_be_bytes(), &out);
                }
                Ok(())
            }
        }
    };
}

game_service!(GameSessions);
game_service!(PlainGameSessions);

/// Deterministic workload: event `i` of a run with `players` players.
/// Events of one player always go to the same partition (keyed by player),
/// so per-player order is the log's order.
pub fn event(i: u64, players: u64) -> GameEvent {
    let player = (i.wrapping_mul(2_654_435_761)) % players.max(1);
    if i % 3 == 0 {
        GameEvent::Flap { player }
    } else {
        GameEvent::Tick { player }
    }
}

/// The score query sent with input tick `tick` of a game of `players`
/// players: one of four probe ids just above the players' (no session, so
/// the answer is score 0), rotating so the queries spread over partitions.
pub fn heartbeat_query(tick: u64, players: u64) -> GameEvent {
    GameEvent::Query {
        player: players + tick % 4,
    }
}

/// The reference fold: the expected state and outputs `(partition, offset,
/// player, score)` from the input, with no runtime involved. Input is
/// `(partition, offset, event)` in any interleaving of partitions; each
/// partition must be in offset order.
pub fn reference_fold(input: &[(i32, i64, GameEvent)]) -> (GameSessions, Vec<(i32, i64, u64, u64)>) {
    let mut state = GameSessions::default();
    let mut outputs = Vec::new();
    for (partition, offset, event) in input {
        state.events += 1;
        if let Some((player, score)) = play(&mut state.sessions, event) {
            outputs.push((*partition, *offset, player, score));
        }
    }
    (state, outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn birds_fly_score_and_crash() {
        let mut sessions = HashMap::new();
        play(
            &mut sessions,
            &GameEvent::Join {
                player: 1,
                board_bytes: 16,
            },
        );
        assert_eq!(sessions[&1].board.len(), 16);
        let mut scores = Vec::new();
        for i in 0..200u64 {
            let e = if i % 4 == 0 {
                GameEvent::Flap { player: 1 }
            } else {
                GameEvent::Tick { player: 1 }
            };
            scores.extend(play(&mut sessions, &e));
        }
        assert!(!scores.is_empty());
        // Without flapping the bird falls and the session ends.
        for _ in 0..200 {
            play(&mut sessions, &GameEvent::Tick { player: 1 });
        }
        assert!(!sessions[&1].alive);
    }

    #[test]
    fn persistent_and_plain_states_snapshot_and_digest_alike() {
        let (mut persistent, mut plain) = (GameSessions::default(), PlainGameSessions::default());
        for i in 0..500 {
            let e = if i < 10 {
                GameEvent::Join {
                    player: i,
                    board_bytes: 64,
                }
            } else {
                event(i, 10)
            };
            play(&mut persistent.sessions, &e);
            play(&mut plain.sessions, &e);
        }
        assert_eq!(persistent.digest(), plain.digest());
        let from_plain = GameSessions::restore(1, &plain.snapshot().unwrap()).unwrap();
        assert_eq!(from_plain, persistent);
        let frozen = persistent.freeze().expect("GameSessions freezes");
        assert_eq!(frozen.digest(), plain.digest());
    }

    #[test]
    fn a_query_is_always_answered_with_the_current_score() {
        let mut sessions = HashMap::new();
        let unknown = heartbeat_query(0, 10);
        assert_eq!(play(&mut sessions, &unknown), Some((unknown.player(), 0)));
        play(
            &mut sessions,
            &GameEvent::Join {
                player: 1,
                board_bytes: 0,
            },
        );
        sessions.get_mut(&1).unwrap().score = 7;
        assert_eq!(play(&mut sessions, &GameEvent::Query { player: 1 }), Some((1, 7)));
        assert_eq!(sessions[&1].score, 7);
    }

    #[test]
    fn snapshot_roundtrip_and_digest() {
        let mut state = GameSessions::default();
        for p in 0..10 {
            play(
                &mut state.sessions,
                &GameEvent::Join {
                    player: p,
                    board_bytes: 100,
                },
            );
        }
        let bytes = state.snapshot().unwrap();
        let back = GameSessions::restore(1, &bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.digest(), state.digest());
    }
}
