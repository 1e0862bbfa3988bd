package batchq

import "github.com/batchq/batchq/internal/protocol"

// WithConsumerOption passes a consumer option through, for tests.
func WithConsumerOption(o protocol.Option) Option { return withConsumer(o) }
