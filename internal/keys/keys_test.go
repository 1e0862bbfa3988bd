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
		{CheckKey(""), ErrKeyName},
		{CheckKey(long), ErrKeyName},
		{CheckPrefix("app:v2"), nil},
		{CheckPrefix(""), ErrPrefix},
		{CheckPrefix("a}"), ErrPrefix},
	} {
		if !errors.Is(c.err, c.want) || (c.want == nil) != (c.err == nil) {
			t.Errorf("got %v, want %v", c.err, c.want)
		}
	}
}
