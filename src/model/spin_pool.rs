//! The browser's CPU threads kept awake for one forward pass.
//!
//! Why: a decode step's matrix products are short (a 1280² q8_0 product reads 1.7 MB, a
//! tenth of a millisecond), and rayon's idle threads go to sleep within microseconds; waking
//! one (`Atomics.notify` in the threaded wasm build) costs about as long as such a product,
//! so splitting it across sleeping threads gained nothing (407M q8_0 decode: 27.7 tok/s on
//! two threads, 26.1 on one). Here, while a forward pass runs, the other threads of rayon's
//! pool spin on an atomic counter and take units of each product as it is posted, as
//! candle's barrier pool does natively. Between forward passes they return to rayon.
//!
//! `forward_on_pool` runs the pass; [`split`] runs a product's units on it (or on rayon,
//! outside a pass).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// One product's units, posted to the spinning threads: a closure called with unit numbers.
struct Job {
    /// The closure, type-erased: `call(data, unit)`.
    call: unsafe fn(*const (), usize),
    data: *const (),
    units: usize,
    /// The next unit to take.
    next: AtomicUsize,
    /// Units finished.
    done: AtomicUsize,
}

/// What the threads of one forward pass share.
struct Crew {
    /// The posted job, null between products.
    job: AtomicPtr<Job>,
    /// Helpers between reading `job` and being done with it: a product returns only once
    /// it has cleared `job` and this is 0, so no helper still holds its job.
    looking: AtomicUsize,
    stop: AtomicBool,
}

thread_local! {
    /// The crew of the forward pass running on this thread, if any.
    static CREW: Cell<*const Crew> = const { Cell::new(std::ptr::null()) };
}

/// Runs `forward` on one of rayon's threads with the pool's other threads spinning, ready
/// for [`split`]'s units, until it returns. With one thread (the single-threaded build),
/// just runs it.
pub fn forward_on_pool<R: Send>(forward: impl FnOnce() -> R + Send) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 {
        return forward();
    }
    let crew = Crew {
        job: AtomicPtr::new(std::ptr::null_mut()),
        looking: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    };
    rayon::scope(|s| {
        let crew = &crew;
        for _ in 0..helpers {
            s.spawn(move |_| help(crew));
        }
        CREW.with(|c| c.set(crew));
        let out = forward();
        CREW.with(|c| c.set(std::ptr::null()));
        crew.stop.store(true, Ordering::Release);
        out
    })
}

/// A helper's loop: take units of whatever job is posted until the pass ends.
fn help(crew: &Crew) {
    while !crew.stop.load(Ordering::Acquire) {
        // Idle spins only read: the read-modify-writes on `looking` are for a posted job,
        // so they do not bounce its cache line between the cores while nothing is posted.
        if crew.job.load(Ordering::Relaxed).is_null() {
            std::hint::spin_loop();
            continue;
        }
        crew.looking.fetch_add(1, Ordering::SeqCst);
        let job = crew.job.load(Ordering::SeqCst);
        // SAFETY: a job is alive while it is posted and until no helper is looking (see
        // `looking`), and this one is looking, having read `job` after counting itself.
        let ran = !job.is_null() && unsafe { take_units(&*job) };
        crew.looking.fetch_sub(1, Ordering::SeqCst);
        if !ran {
            std::hint::spin_loop();
        }
    }
}

/// Runs units of `job` until none is left; whether it ran any.
///
/// # Safety
/// `job`'s closure must be alive.
unsafe fn take_units(job: &Job) -> bool {
    let mut ran = false;
    loop {
        let unit = job.next.fetch_add(1, Ordering::AcqRel);
        if unit >= job.units {
            return ran;
        }
        (job.call)(job.data, unit);
        job.done.fetch_add(1, Ordering::AcqRel);
        ran = true;
    }
}

/// Calls `unit(i)` for every `i` in `0..units`, split across the forward pass's spinning
/// threads where one runs on this thread, else across rayon's pool.
pub fn split(units: usize, unit: impl Fn(usize) + Sync) {
    let crew = CREW.with(Cell::get);
    if crew.is_null() {
        use rayon::prelude::*;
        (0..units).into_par_iter().for_each(&unit);
        return;
    }
    unsafe fn call<F: Fn(usize)>(data: *const (), i: usize) {
        (*data.cast::<F>())(i)
    }
    // A named local: the job points at it, so it must outlive the job.
    let unit: &(dyn Fn(usize) + Sync) = &unit;
    let job = Job {
        call: call::<&(dyn Fn(usize) + Sync)>,
        data: std::ptr::from_ref(&unit).cast(),
        units,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
    };
    // SAFETY: `crew` was set by `forward_on_pool` on this thread and outlives its pass.
    let crew = unsafe { &*crew };
    crew.job
        .store(std::ptr::from_ref(&job).cast_mut(), Ordering::SeqCst);
    // SAFETY: `unit` and `job` live on this stack frame until no helper can reach them.
    unsafe { take_units(&job) };
    while job.done.load(Ordering::Acquire) < units {
        std::hint::spin_loop();
    }
    // A helper that reads `job` after this store finds it cleared; one that read it
    // before is counted in `looking` until it lets go.
    crew.job.store(std::ptr::null_mut(), Ordering::SeqCst);
    while crew.looking.load(Ordering::SeqCst) != 0 {
        std::hint::spin_loop();
    }
}
