//! [`WithUpgrades`]: any handler, plus the upgrade counters in `/metrics`. It passes every
//! callback through unchanged and appends `sockman_upgrades_total` after the handler's own
//! families (the admin endpoint asks worker 0's handler only, so they appear once).

use std::sync::Arc;

use sockman::{CloseReason, Context, Eof, Handler, Idle};

use super::Upgrades;

/// `H` with the upgrade counters in `/metrics`.
#[derive(Debug)]
pub(crate) struct WithUpgrades<H> {
    inner: H,
    upgrades: Arc<Upgrades>,
}

impl<H> WithUpgrades<H> {
    pub(crate) fn new(inner: H, upgrades: Arc<Upgrades>) -> WithUpgrades<H> {
        WithUpgrades { inner, upgrades }
    }
}

impl<H: Handler> Handler for WithUpgrades<H> {
    type Conn = H::Conn;
    const PAUSE_READING_WHILE_PENDING: bool = H::PAUSE_READING_WHILE_PENDING;

    fn on_open(&mut self, ctx: &mut Context<'_, H::Conn>) -> H::Conn {
        self.inner.on_open(ctx)
    }

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
        self.inner.on_close(conn, ctx, reason);
    }

    fn on_periodic(&mut self, ctx: &mut Context<'_, H::Conn>) {
        self.inner.on_periodic(ctx);
    }

    fn describe(&self, conn: &H::Conn, out: &mut String) {
        self.inner.describe(conn, out);
    }

    fn write_metrics(&self, out: &mut String) {
        self.inner.write_metrics(out);
        self.upgrades.write_metrics(out);
    }
}
