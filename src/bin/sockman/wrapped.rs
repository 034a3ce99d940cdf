//! [`Wrapped`]: a handler `H` with something added around it ([`Around`]): every callback is
//! `H`'s, and the addition sees the close, the periodic tick and the `/metrics` text. The
//! access log (`serve --access-log`) and the upgrade counters are such additions; one wrapper
//! serves both, so neither repeats the forwarding of every callback.

use sockman::{CloseReason, Context, Eof, Handler, Idle};

/// What a [`Wrapped`] handler adds to `H`; each hook runs next to `H`'s own callback.
pub(crate) trait Around {
    /// At a close, before `H::on_close` (the connection's accessors still answer).
    fn on_close<C>(&mut self, _ctx: &mut Context<'_, C>, _reason: CloseReason) {}
    /// At the periodic tick, before `H::on_periodic`.
    fn on_periodic(&mut self) {}
    /// After `H`'s own families in `/metrics`.
    fn write_metrics(&self, out: &mut String);
}

/// `H` with `A` around it.
#[derive(Debug)]
pub(crate) struct Wrapped<H, A> {
    inner: H,
    around: A,
}

impl<H, A> Wrapped<H, A> {
    pub(crate) fn new(inner: H, around: A) -> Wrapped<H, A> {
        Wrapped { inner, around }
    }
}

impl<H: Handler, A: Around> Handler for Wrapped<H, A> {
    type Conn = H::Conn;
    const PAUSE_READING_WHILE_PENDING: bool = H::PAUSE_READING_WHILE_PENDING;

    fn on_open(&mut self, ctx: &mut Context<'_, H::Conn>) -> H::Conn {
        self.inner.on_open(ctx)
    }

    #[inline]
    fn on_data(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>, data: &[u8]) {
        self.inner.on_data(conn, ctx, data);
    }

    fn on_connected(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) {
        self.inner.on_connected(conn, ctx);
    }

    fn on_eof(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) -> Eof {
        self.inner.on_eof(conn, ctx)
    }

    fn on_drained(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) {
        self.inner.on_drained(conn, ctx);
    }

    fn on_timer(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) {
        self.inner.on_timer(conn, ctx);
    }

    fn on_idle(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) -> Idle {
        self.inner.on_idle(conn, ctx)
    }

    fn on_close(&mut self, conn: H::Conn, ctx: &mut Context<'_, H::Conn>, reason: CloseReason) {
        self.around.on_close(ctx, reason);
        self.inner.on_close(conn, ctx, reason);
    }

    fn on_periodic(&mut self, ctx: &mut Context<'_, H::Conn>) {
        self.around.on_periodic();
        self.inner.on_periodic(ctx);
    }

    fn describe(&self, conn: &H::Conn, out: &mut String) {
        self.inner.describe(conn, out);
    }

    fn write_metrics(&self, out: &mut String) {
        self.inner.write_metrics(out);
        self.around.write_metrics(out);
    }
}
