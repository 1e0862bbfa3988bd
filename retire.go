package batchq

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq/internal/protocol"
)

// retireTimeout bounds the call that takes a stopping worker off the list
// of live workers: shutdown must not wait long for Redis.
const retireTimeout = time.Second

// retire takes the worker off the list of live workers, in which
// runner.register announces it at start and every 30 seconds. A failure
// is logged and left: the list drops workers it has not seen for
// protocol.WorkerExpiry.
func (r *runner) retire() {
	ctx, cancel := context.WithTimeout(context.Background(), retireTimeout)
	defer cancel()
	if err := r.w.cons.Retire(ctx); err != nil {
		r.w.log.Info("cannot take the worker off the list of live workers; it drops off when its announcement expires",
			zap.Duration("expiry", protocol.WorkerExpiry), zap.Error(err))
	}
}
