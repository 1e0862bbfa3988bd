package keys

import (
	"errors"
	"strings"
	"testing"
)

func TestSpaceNames(t *testing.T) {
	sp := For("app", "emails", 3)
	for _, c := range []struct{ got, want string }{
		{sp.Items("user:42"), "app:{emails:3}:k:user:42"},
		{sp.Count("user:42"), "app:{emails:3}:n:user:42"},
		{sp.LeaseCount("tok"), "app:{emails:3}:leasen:tok"},
		{sp.Ready(), "app:{emails:3}:ready"},
		{sp.Wake(), "app:{emails:3}:wake"},
		{sp.Leases(), "app:{emails:3}:leases"},
		{sp.Later(), "app:{emails:3}:later"},
		{sp.Lease("tok"), "app:{emails:3}:lease:tok"},
		{sp.Retry(), "app:{emails:3}:retry"},
		{sp.RetryData(), "app:{emails:3}:retrydata"},
		{sp.Dead(), "app:{emails:3}:dead"},
		{sp.DeadData(), "app:{emails:3}:deaddata"},
		{sp.Quarantine("id"), "app:{emails:3}:quarantine:id"},
		{sp.Quarantined(), "app:{emails:3}:quarantined"},
		{sp.Settled("id"), "app:{emails:3}:settled:id"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
	// A key with braces cannot move the hash tag: the first {...} wins.
	if got := sp.Items("{x}"); !strings.HasPrefix(got, "app:{emails:3}:") {
		t.Errorf("items key %q", got)
	}
}

// The keys of live workers share the registry's hash slot (its name is
// their hash tag), and neither looks like a queue shard's key space.
func TestWorkerKeys(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{Registry("app"), "app:queues"},
		{Workers("app"), "app:workers:{app:queues}"},
		{WorkerData("app"), "app:workerdata:{app:queues}"},
		{Workers("a:b"), "a:b:workers:{a:b:queues}"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
	if strings.HasPrefix(Workers("app"), "app:{") || strings.HasPrefix(WorkerData("app"), "app:{") {
		t.Error("a worker key looks like a queue's key space")
	}
}

func TestShard(t *testing.T) {
	if Shard("anything", 1) != 0 || Shard("anything", 0) != 0 {
		t.Fatal("one shard must be shard 0")
	}
	counts := make([]int, 8)
	for i := range 8000 {
		k := "key" + string(rune('a'+i%26)) + strings.Repeat("x", i%7) + string(rune(i))
		s := Shard(k, 8)
		if s != Shard(k, 8) {
			t.Fatalf("shard of %q not stable", k)
		}
		counts[s]++
	}
	for s, n := range counts {
		if n < 700 || n > 1300 {
			t.Errorf("shard %d got %d of 8000 keys: %v", s, n, counts)
		}
	}
	// Stable across releases: producers and workers of different versions
	// must agree.
	if got := Shard("user:42", 16); got != 2 {
		t.Errorf("Shard(user:42, 16) = %d; the hash changed", got)
	}
}

func TestChecks(t *testing.T) {
	long := strings.Repeat("a", MaxNameLen+1)
	for _, c := range []struct {
		err  error
		want error
	}{
		{CheckQueue("emails"), nil},
		{CheckQueue(""), ErrQueueName},
		{CheckQueue("a:b"), ErrQueueName},
		{CheckQueue("a{b"), ErrQueueName},
		{CheckQueue(long), ErrQueueName},
		{CheckQueue("."), ErrQueueName},
		{CheckQueue(".."), ErrQueueName},
		{CheckQueue("..."), nil},
		{CheckQueue("a/../b"), nil},
		{CheckQueue("ü日本 a/b"), nil},
		{CheckQueue("a\x00b"), ErrQueueName},
		{CheckQueue("a\nb"), ErrQueueName},
		{CheckQueue("esc\x1b[31mRED"), ErrQueueName},
		{CheckQueue("\xff"), ErrQueueName},
		{CheckKey("user:42/{x}"), nil},
		{CheckKey("ü日本 a/b\u200b"), nil}, // format characters are not control characters
		{CheckKey(""), ErrKeyName},
		{CheckKey(long), ErrKeyName},
		{CheckKey("a\x00b"), ErrKeyName},
		{CheckKey("a\nb"), ErrKeyName},
		{CheckKey("a\rb"), ErrKeyName},
		{CheckKey("a\tb"), ErrKeyName},
		{CheckKey("esc\x1b[31mRED"), ErrKeyName},
		{CheckKey("del\x7f"), ErrKeyName},
		{CheckKey("c1\u0085"), ErrKeyName},
		{CheckKey("\xff"), ErrKeyName},
		{CheckKey("ab\xc3"), ErrKeyName}, // a rune cut short
		{CheckStoredKey("a\nb\xff"), nil},
		{CheckStoredKey(""), ErrKeyName},
		{CheckStoredKey(long), ErrKeyName},
		{CheckPrefix("app:v2"), nil},
		{CheckPrefix(""), ErrPrefix},
		{CheckPrefix("a}"), ErrPrefix},
	} {
		if !errors.Is(c.err, c.want) || (c.want == nil) != (c.err == nil) {
			t.Errorf("got %v, want %v", c.err, c.want)
		}
	}
}

func TestShort(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"", ""},
		{"user:42", "user:42"},
		{strings.Repeat("a", 64), strings.Repeat("a", 64)},
		{strings.Repeat("a", 65), strings.Repeat("a", 64) + "…(65 bytes)"},
		{strings.Repeat("a", 10240), strings.Repeat("a", 64) + "…(10240 bytes)"},
		// 63 bytes, then a 3-byte rune across the cut: the rune goes whole.
		{strings.Repeat("a", 63) + "日本", strings.Repeat("a", 63) + "…(69 bytes)"},
		{strings.Repeat("a", 62) + "日本", strings.Repeat("a", 62) + "…(68 bytes)"},
		{strings.Repeat("a", 61) + "日本", strings.Repeat("a", 61) + "日…(67 bytes)"},
		// Invalid UTF-8 is cut at a byte like any other.
		{strings.Repeat("\xff", 70), strings.Repeat("\xff", 64) + "…(70 bytes)"},
		// A run of continuation bytes is cut within a rune's length.
		{strings.Repeat("\x80", 70), strings.Repeat("\x80", 61) + "…(70 bytes)"},
	} {
		if got := Short(c.in); got != c.want {
			t.Errorf("Short(%.20q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// Errors name a long or hostile name by its start, quoted: a 10 KB name
// makes a short error, and no control character reaches a log line.
func TestCheckErrorsAreShort(t *testing.T) {
	huge := strings.Repeat("x", 10<<10)
	for _, err := range []error{CheckKey(huge), CheckStoredKey(huge), CheckQueue(huge), CheckPrefix(huge), CheckKey(huge + "\n")} {
		if err == nil || len(err.Error()) > 256 {
			t.Errorf("%d-byte error: %.300s", len(err.Error()), err)
		}
	}
	if err := CheckKey("a\nb\x00\x1b[31m"); !strings.Contains(err.Error(), `"a\nb\x00\x1b[31m"`) {
		t.Errorf("control characters not escaped: %v", err)
	}
}
