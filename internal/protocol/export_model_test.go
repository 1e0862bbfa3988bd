package protocol

// BatchID returns the id of b: its lease token when it is leased. The retry
// or dead letter of b.Items[i] is named BatchID(b) + fmt.Sprintf("-%07d", i).
// The model test (model_test.go) uses it to predict the order in which
// Reap returns leases and the ids of retries and dead letters.
func BatchID(b *Batch) string { return b.id }
