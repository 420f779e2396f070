//! The scheduler thread: keeps the compiled batch full by slot refill, steps the decode
//! graph, and turns each row's tokens into text events (stop strings, token limits).
//!
//! A refill costs its own tokens (the prefill kernels skip padding and the rows not
//! refilled), so a free row is refilled as soon as a request waits. Prompts are prefilled
//! one chunk of `T` tokens at a time ([`Session::refill_chunk`]), and each iteration runs
//! at most one prefill of at most `T` real tokens (one chunk, or several rows' chunks that
//! together fit in `T`) before the decode step of the running rows: a running row's gap
//! between two tokens is bounded by one decode step plus one prefill of `T` tokens,
//! however many or long the prompts that arrive.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use super::{Event, EventSink, FinishReason, Job, Metrics, Schedule, Usage};
use crate::RuntimeError;
use crate::exec::session::{Refill, RefillChunk, Session};

/// A request whose prompt is being prefilled, chunk by chunk, into a row.
struct Admitted {
    row: usize,
    job: Job,
    /// Prompt tokens the row's cache held already (not prefilled).
    kept: usize,
    /// The next chunk to prefill (of the prompt after the kept tokens).
    chunk: usize,
}
use crate::load::tokenizer::Tokenizer;

/// A request in a row.
struct Running<'t> {
    sink: Box<dyn EventSink>,
    max_new: usize,
    stop: Vec<String>,
    stream: crate::load::tokenizer::TextStream<'t>,
    /// Text generated and not yet sent (it may be the start of a stop string).
    held: String,
    generated: usize,
    usage: Usage,
}

/// The scheduler thread's state.
pub(super) struct Scheduler<'t> {
    session: Session,
    tokenizer: &'t Tokenizer,
    metrics: &'t Metrics,
    /// One entry per row: the request it runs, if any.
    rows: Vec<Option<Running<'t>>>,
    /// Requests being prefilled, in the order they were admitted (each holds its row).
    admitted: VecDeque<Admitted>,
    /// Per row, the prompt tokens whose keys and values its cache holds at positions
    /// `0..` as a prefill wrote them (the last prompt it ran): a new prompt that begins
    /// with them keeps them. Empty unless every layer's cache keeps every position (a
    /// budgeted policy or a sliding window keeps other slots).
    cached: Vec<Vec<u32>>,
    /// Whether admission looks for a row whose cache holds a prefix of the prompt.
    prompt_reuse: bool,
    queue: VecDeque<Job>,
    schedule: Schedule,
}

/// How long an idle scheduler waits for work before checking its channel again.
const IDLE_WAIT: Duration = Duration::from_millis(250);

impl<'t> Scheduler<'t> {
    /// A scheduler over `session`'s rows, all free.
    pub(super) fn new(
        session: Session,
        tokenizer: &'t Tokenizer,
        metrics: &'t Metrics,
        schedule: Schedule,
    ) -> Self {
        Scheduler {
            session,
            tokenizer,
            metrics,
            rows: Vec::new(),
            admitted: VecDeque::new(),
            cached: Vec::new(),
            prompt_reuse: true,
            queue: VecDeque::new(),
            schedule,
        }
    }

    /// Turns prompt reuse on or off (on by default).
    pub(super) fn set_prompt_reuse(&mut self, on: bool) {
        self.prompt_reuse = on;
    }

    /// Serves jobs until the channel closes.
    pub(super) fn run(&mut self, jobs: &Receiver<Job>) -> Result<(), RuntimeError> {
        let b = self.session.batch();
        self.rows = (0..b).map(|_| None).collect();
        self.cached = vec![Vec::new(); b];
        let stops = self.session.program().config.stop_tokens.clone();
        let mut open = true;
        loop {
            // 1. Take what arrived; block only when there is nothing to run.
            loop {
                let idle = self.queue.is_empty()
                    && self.admitted.is_empty()
                    && self.rows.iter().all(Option::is_none);
                let next = if idle && open {
                    match jobs.recv_timeout(IDLE_WAIT) {
                        Ok(j) => Ok(j),
                        Err(RecvTimeoutError::Timeout) => Err(TryRecvError::Empty),
                        Err(RecvTimeoutError::Disconnected) => Err(TryRecvError::Disconnected),
                    }
                } else if open {
                    jobs.try_recv()
                } else {
                    Err(TryRecvError::Disconnected)
                };
                match next {
                    Ok(job) => self.queue.push_back(job),
                    Err(TryRecvError::Empty) if idle => continue,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            if !open
                && self.queue.is_empty()
                && self.admitted.is_empty()
                && self.rows.iter().all(Option::is_none)
            {
                return Ok(());
            }
            // 2. Cancelled requests leave the queue and free their rows.
            let before = self.queue.len();
            self.queue.retain(|j| !j.sink.is_closed());
            let dropped = (before - self.queue.len()) as u64;
            self.metrics.queued.fetch_sub(dropped, Ordering::Relaxed);
            self.metrics.in_flight.fetch_sub(dropped, Ordering::Relaxed);
            Metrics::add(&self.metrics.cancelled, dropped);
            for row in self.rows.iter_mut() {
                if row.as_ref().is_some_and(|r| r.sink.is_closed()) {
                    *row = None;
                    self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
                    Metrics::add(&self.metrics.cancelled, 1);
                }
            }
            // A request cancelled mid-prompt frees its row (parked: done); the row's cache
            // still holds the prefix it kept.
            let before = self.admitted.len() as u64;
            let cached = &mut self.cached;
            self.admitted.retain(|a| {
                let closed = a.job.sink.is_closed();
                if closed {
                    cached[a.row] = a.job.ids[..a.kept].to_vec();
                }
                !closed
            });
            let dropped = before - self.admitted.len() as u64;
            self.metrics.in_flight.fetch_sub(dropped, Ordering::Relaxed);
            Metrics::add(&self.metrics.cancelled, dropped);
            // 3. Admit waiting requests into free rows, then prefill one run's worth of
            //    their prompts.
            let held: Vec<usize> = self.admitted.iter().map(|a| a.row).collect();
            let mut free: Vec<usize> = (0..b)
                .filter(|&i| self.rows[i].is_none() && !held.contains(&i))
                .collect();
            if self.time_to_admit(free.len(), b) {
                while !free.is_empty() {
                    let Some(job) = self.queue.pop_front() else {
                        break;
                    };
                    self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                    // The free row whose cache holds the longest prefix of the prompt
                    // (the first free row when none holds any).
                    let (at, kept) = free
                        .iter()
                        .enumerate()
                        .map(|(at, &row)| (at, reusable(&self.cached[row], &job.ids)))
                        .fold((0, 0), |best, c| if c.1 > best.1 { c } else { best });
                    let row = free.remove(at);
                    self.cached[row].clear();
                    Metrics::add(&self.metrics.prompt_tokens_reused, kept as u64);
                    self.admitted.push_back(Admitted {
                        row,
                        job,
                        kept,
                        chunk: 0,
                    });
                }
            }
            if !self.admitted.is_empty() {
                self.prefill_chunks(&stops)?;
            }
            // 4. One decode step for the running rows.
            let busy = self.rows.iter().filter(|r| r.is_some()).count() as u64;
            self.metrics.active.store(busy, Ordering::Relaxed);
            if busy > 0 {
                let t0 = Instant::now();
                let out = self.session.step()?;
                let secs = t0.elapsed().as_secs_f64();
                Metrics::add(&self.metrics.step_micros, (secs * 1e6) as u64);
                Metrics::add(&self.metrics.steps, 1);
                Metrics::add(&self.metrics.busy_row_steps, busy);
                for row in 0..b {
                    if self.rows[row].is_some() {
                        self.deliver(row, out.tokens[row], out.done[row], &stops);
                    }
                }
                let busy = self.rows.iter().filter(|r| r.is_some()).count() as u64;
                self.metrics.active.store(busy, Ordering::Relaxed);
            }
        }
    }

    /// Whether waiting requests take free rows now: at once (a refill costs its own
    /// tokens), except in the batch-at-a-time schedule, which waits for every row.
    fn time_to_admit(&self, free: usize, b: usize) -> bool {
        if free == 0 || self.queue.is_empty() {
            return false;
        }
        match self.schedule {
            Schedule::Refill => true,
            Schedule::WholeBatch => free == b,
        }
    }

    /// One prefill run: the next chunk of the admitted prompts, oldest first, as many as
    /// fit in `T` real tokens together (at least one). A prompt whose last chunk ran
    /// starts its row: its first token is delivered.
    fn prefill_chunks(&mut self, stops: &[u32]) -> Result<(), RuntimeError> {
        let t = self.session.program().config.prefill_len as usize;
        let mut tokens = 0;
        let mut picked = Vec::new();
        for (k, a) in self.admitted.iter().enumerate() {
            let piece = self
                .session
                .chunk_tokens(a.job.ids.len(), a.kept, a.chunk)
                .len();
            if !picked.is_empty() && tokens + piece > t {
                break;
            }
            tokens += piece;
            picked.push(k);
        }
        let pieces: Vec<RefillChunk<'_>> = picked
            .iter()
            .map(|&k| {
                let a = &self.admitted[k];
                RefillChunk {
                    refill: Refill {
                        row: a.row,
                        request: &a.job.request,
                        seed: a.job.seed,
                    },
                    kept: a.kept,
                    chunk: a.chunk,
                }
            })
            .collect();
        let running = self.rows.iter().filter(|r| r.is_some()).count();
        let t0 = Instant::now();
        let out = self.session.refill_chunk(&pieces)?;
        let secs = t0.elapsed().as_secs_f64();
        drop(pieces);
        Metrics::add(&self.metrics.refill_micros, (secs * 1e6) as u64);
        Metrics::add(&self.metrics.refills, 1);
        Metrics::add(&self.metrics.prompt_tokens, tokens as u64);
        // Finished prompts leave the admitted list (highest index first).
        let mut started = Vec::new();
        for &k in picked.iter().rev() {
            let a = &mut self.admitted[k];
            a.chunk += 1;
            if a.chunk >= self.session.chunks(a.job.ids.len() - a.kept) {
                started.push(self.admitted.remove(k).expect("picked"));
            }
        }
        let reuse = self.prompt_reuse && self.session.keeps_every_position();
        for a in started.into_iter().rev() {
            let Admitted { row, job, .. } = a;
            if reuse {
                self.cached[row] = job.ids.clone();
            }
            Metrics::add(&self.metrics.rows_filled, 1);
            if running > 0 {
                Metrics::add(&self.metrics.rows_filled_running, 1);
            }
            self.rows[row] = Some(Running {
                sink: job.sink,
                max_new: job.request.max_new_tokens,
                stop: job.stop,
                stream: self.tokenizer.stream(true),
                held: String::new(),
                generated: 0,
                usage: Usage {
                    prompt_tokens: job.ids.len(),
                    completion_tokens: 0,
                },
            });
            self.deliver(row, out.tokens[row], out.done[row], stops);
        }
        Ok(())
    }

    /// Handles the token a run produced for `row`: stop token, text, stop strings and the
    /// token limit, as [`Session::generate`] does; frees the row when it finishes.
    fn deliver(&mut self, row: usize, id: u32, done: bool, stops: &[u32]) {
        let Some(r) = self.rows[row].as_mut() else {
            return;
        };
        let finish = if stops.contains(&id) {
            Some(FinishReason::Stop)
        } else {
            r.generated += 1;
            r.usage.completion_tokens += 1;
            Metrics::add(&self.metrics.generated_tokens, 1);
            let piece = r.stream.push(id).unwrap_or_default();
            r.held.push_str(&piece);
            let hit = r.stop.iter().filter_map(|s| r.held.find(s.as_str())).min();
            let finish = if hit.is_some() {
                Some(FinishReason::Stop)
            } else if done || r.generated >= r.max_new {
                Some(FinishReason::Length)
            } else {
                None
            };
            let text = match (hit, finish) {
                (Some(at), _) => {
                    let t = r.held[..at].to_string();
                    r.held.clear();
                    // Bytes of a character after the stop string are not part of the text.
                    r.stream.finish();
                    t
                }
                // The last token: nothing can complete a stop string any more, and a
                // character it left incomplete is no text.
                (None, Some(_)) => {
                    r.stream.finish();
                    std::mem::take(&mut r.held)
                }
                (None, None) => {
                    // Send all but a tail that could still begin a stop string.
                    let keep = held_back(&r.held, &r.stop);
                    let cut = r.held.len() - keep;
                    r.held.drain(..cut).collect()
                }
            };
            if !r.sink.send(Event::Token { id, text }) {
                self.rows[row] = None;
                self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
                Metrics::add(&self.metrics.cancelled, 1);
                return;
            }
            finish
        };
        if let Some(reason) = finish {
            let mut r = self.rows[row].take().expect("running");
            // A stop token: release text held for a stop string that never came.
            r.stream.finish();
            let rest = std::mem::take(&mut r.held);
            if !rest.is_empty() {
                r.sink.send(Event::Text(rest));
            }
            r.sink.send(Event::Done(r.usage, reason));
            Metrics::add(&self.metrics.finished, 1);
            self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Tells every waiting and running request (and those still in the channel) that the
    /// scheduler stopped, and clears the gauges they held.
    pub(super) fn fail_all(&mut self, why: &str, jobs: &Receiver<Job>) {
        let m = self.metrics;
        let waiting: Vec<Job> = self.queue.drain(..).chain(jobs.try_iter()).collect();
        for mut j in waiting {
            j.sink.send(Event::Failed(why.to_string()));
            m.queued.fetch_sub(1, Ordering::Relaxed);
            m.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        for mut a in self.admitted.drain(..) {
            a.job.sink.send(Event::Failed(why.to_string()));
            m.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        for mut r in self.rows.iter_mut().filter_map(Option::take) {
            r.sink.send(Event::Failed(why.to_string()));
            m.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        m.active.store(0, Ordering::Relaxed);
    }
}

/// Prompt tokens a row whose cache holds `cached` (a prompt it prefilled) keeps for
/// `prompt`: their common prefix, leaving at least one token to prefill (its logits give
/// the first generated token).
fn reusable(cached: &[u32], prompt: &[u32]) -> usize {
    let common = cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    common.min(prompt.len().saturating_sub(1))
}

/// Bytes at the end of `text` to hold back: the longest suffix that is a proper prefix
/// of a stop string (on a character boundary).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > keep && text.ends_with(&s[..i]) {
                keep = i;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::{held_back, reusable};

    #[test]
    fn a_prompt_reuses_its_common_prefix_but_its_last_token() {
        assert_eq!(reusable(&[1, 2, 3], &[1, 2, 3, 4, 5]), 3);
        assert_eq!(reusable(&[1, 2, 3], &[1, 2, 9]), 2);
        assert_eq!(reusable(&[1, 2, 3], &[1, 2, 3]), 2);
        assert_eq!(reusable(&[], &[1, 2]), 0);
        assert_eq!(reusable(&[4], &[1, 2]), 0);
        assert_eq!(reusable(&[1], &[]), 0);
    }

    #[test]
    fn held_back_keeps_the_longest_stop_prefix() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abcE", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("", &stops), 0);
        assert_eq!(held_back("ab→", &["→x".to_string()]), "→".len());
    }
}
