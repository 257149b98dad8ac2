//! How a consumer that waits outside the stream's own blocking calls (an asyncio event loop,
//! woken through a file descriptor) learns that results came: it arms the bell when it finds
//! nothing to take, and whoever next hands results over (or ends a thread, or cancels) rings it,
//! once. Unarmed, a ring is one fence and one load: the producers ring on every hand-over.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::OnceLock;

type Ringer = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
pub struct Bell {
    armed: AtomicBool,
    ringer: OnceLock<Ringer>,
}

impl std::fmt::Debug for Bell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bell")
            .field("armed", &self.armed.load(Ordering::Relaxed))
            .field("ringer", &self.ringer.get().is_some())
            .finish()
    }
}

impl Bell {
    /// Sets what a ring does (once per bell); false if it was set already.
    pub fn set_ringer(&self, ring: Ringer) -> bool {
        self.ringer.set(ring).is_ok()
    }

    /// The consumer found nothing: the next ring calls the ringer. The consumer must look
    /// again after arming: what was handed over before the bell was armed rings nothing. It
    /// stays armed if that look finds something (another consumer may be waiting), so a ring
    /// may find nothing left to take.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::Relaxed);
        // Pairs with the fence in `ring`: either the producer sees the bell armed, or the
        // consumer's second look sees what the producer handed over.
        fence(Ordering::SeqCst);
    }

    /// Called after handing something over: calls the ringer if the bell is armed, and
    /// disarms it.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::AcqRel) {
            if let Some(ring) = self.ringer.get() {
                ring();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn rings_once_per_arming_and_never_unarmed() {
        let bell = Bell::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        assert!(bell.set_ringer(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        })));
        assert!(!bell.set_ringer(Box::new(|| {})), "the ringer is set once");
        bell.ring();
        assert_eq!(calls.load(Ordering::SeqCst), 0, "not armed");
        bell.arm();
        bell.ring();
        bell.ring();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one ring per arming");
        bell.arm();
        bell.ring();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "armed again, rung again");
    }

    #[test]
    fn a_hand_over_racing_the_arming_is_never_missed() {
        // The consumer arms then looks; the producer hands over then rings. Whatever the
        // interleaving, the consumer sees the item or the ringer is called.
        for _ in 0..2000 {
            let bell = Arc::new(Bell::default());
            let item = Arc::new(AtomicBool::new(false));
            let rung = Arc::new(AtomicBool::new(false));
            let r = rung.clone();
            bell.set_ringer(Box::new(move || r.store(true, Ordering::SeqCst)));
            let (b, i) = (bell.clone(), item.clone());
            let producer = std::thread::spawn(move || {
                i.store(true, Ordering::Relaxed);
                b.ring();
            });
            bell.arm();
            let seen = item.load(Ordering::Relaxed);
            producer.join().expect("producer");
            assert!(
                seen || rung.load(Ordering::SeqCst),
                "a hand-over was missed"
            );
        }
    }
}
