package batchq

import "github.com/batchq/batchq/consumer"

// WithConsumerOption passes a consumer option through, for tests.
func WithConsumerOption(o consumer.Option) Option { return withConsumer(o) }
