//! How an instance hears of every change, whichever instance or partition appended it: one
//! connection of its own LISTENs on the feed's channel, and what arrives is handed to the hub.
//!
//! Cost: every instance receives every change (about 200 bytes each) and decodes it, then drops
//! those of users it holds no socket for; PostgreSQL sends each notification once per listening
//! instance. So the work grows with instances × change rate: at 2,000 changes/s and 20 instances,
//! 40,000 small messages/s leave the primary. That is where this design stops; past it, changes
//! would go on channels per user shard (an instance listening only to the shards of the users it
//! holds) or on a broker topic each instance reads.

use std::sync::Arc;
use std::time::Duration;

use service_kit::db::Database;
use service_kit::sqlx::postgres::{PgListener, PgPoolOptions};
use service_kit::workers::StoppableTask;

use super::feed::{Broadcast, CHANNEL};
use super::hub::Hub;

/// Wait before listening again after the connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Listens until stopped, reconnecting after failures; after each (re)connect every socket
/// catches up from the feed, since notifications sent meanwhile are lost.
pub fn spawn(db: &Database, hub: Arc<Hub>) -> StoppableTask {
    let options = db.writer_pool().connect_options();
    StoppableTask::spawn(move |mut stop| async move {
        // Its own connection, outside the writer pool, held for the life of the instance.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*options).clone());
        let mut first = true;
        loop {
            let listened = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(CHANNEL).await?;
                if !std::mem::take(&mut first) {
                    hub.catch_up();
                }
                tracing::info!("listening for changes of the live feed");
                // `try_recv` answers `None` when the connection was lost (then it reconnects).
                while let Some(notification) = listener.try_recv().await? {
                    handle(&hub, notification.payload());
                }
                hub.catch_up();
                Ok::<(), service_kit::sqlx::Error>(())
            };
            tokio::select! {
                outcome = listened => {
                    if let Err(err) = outcome {
                        tracing::warn!(error = %err, "live feed listener failed; listening again");
                    }
                }
                _ = stop.wait_for(|stop| *stop) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    })
}

fn handle(hub: &Hub, payload: &str) {
    match serde_json::from_str::<Broadcast>(payload) {
        Ok(Broadcast::Changes(changes)) => hub.deliver(&changes),
        Ok(Broadcast::Close(order)) => hub.close(&order),
        Err(err) => tracing::warn!(error = %err, "unreadable live feed notification"),
    }
}
