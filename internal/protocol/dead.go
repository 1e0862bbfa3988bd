package protocol

import (
	"encoding/json"
	"strconv"
	"time"
)

// DeadLetter is an item that failed for good, kept with its last error
// (deadletter.Letter is its public twin: the same fields, converted).
type DeadLetter struct {
	ID       string          `json:"id"`
	Queue    string          `json:"queue"`
	Shard    int             `json:"shard"`
	Key      string          `json:"key"`
	Item     json.RawMessage `json:"item"` // byte for byte as appended; null when Corrupt and not a string
	Attempts int             `json:"attempts"`
	Error    string          `json:"error"`
	FailedAt time.Time       `json:"failed_at"`
	// Corrupt marks a key's whole value that was not a JSON array; Item holds
	// it (as a JSON string when it was not JSON). It cannot be requeued.
	Corrupt bool `json:"corrupt,omitempty"`
}

// encode returns the stored form of a dead letter, its envelope.
func (d DeadLetter) encode() []byte {
	b := make([]byte, 0, len(d.Item)+len(d.Key)+len(d.Error)+96)
	b = append(b, `{"id":`...)
	b = appendString(b, d.ID)
	b = append(b, `,"queue":`...)
	b = appendString(b, d.Queue)
	b = append(b, `,"shard":`...)
	b = strconv.AppendInt(b, int64(d.Shard), 10)
	b = append(b, `,"key":`...)
	b = appendString(b, d.Key)
	b = append(b, `,"attempts":`...)
	b = strconv.AppendInt(b, int64(d.Attempts), 10)
	b = append(b, `,"error":`...)
	b = appendString(b, d.Error)
	b = append(b, `,"failed_at":`...)
	b = strconv.AppendInt(b, d.FailedAt.UnixMilli(), 10)
	if d.Corrupt {
		b = append(b, `,"corrupt":true`...)
	}
	b = append(b, `,"item":`...)
	if len(d.Item) == 0 {
		b = append(b, "null"...)
	} else {
		b = append(b, d.Item...)
	}
	return append(b, '}')
}

// DecodeDead returns the dead letter stored as the envelope env.
func DecodeDead(env string) (DeadLetter, error) {
	var s struct {
		DeadLetter
		FailedAt int64 `json:"failed_at"`
	}
	if err := json.Unmarshal([]byte(env), &s); err != nil {
		return DeadLetter{}, err
	}
	d := s.DeadLetter
	d.FailedAt = time.UnixMilli(s.FailedAt)
	return d, nil
}
