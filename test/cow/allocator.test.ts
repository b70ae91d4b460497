// cow/allocator.ts: one byte per chunk of a store file. Runs reuse holes before growing
// the file; reference counts, limbo, recount after replay, the free tail and shrinking.
import t from 'tap';
import { Allocator, REF_FREE, REF_HEADER, REF_LIMBO, REF_META } from '../../cow/allocator.js';

const tags = (a: Allocator, from: number, to: number): number[] => Array.from(a.refs.subarray(from, to));

t.test('a new allocator: header chunks tagged, nothing free, the file ends after the header', async (t) => {
  const a = new Allocator(2);
  t.equal(a.end, 2);
  t.equal(a.freeChunks, 0);
  t.same(tags(a, 0, 3), [REF_HEADER, REF_HEADER, REF_FREE]);
  t.ok(a.bytes >= 1024, 'room for a thousand chunks before growing');
  t.equal(a.usedEnd(), 2);
  t.same([REF_FREE, REF_LIMBO, REF_META, REF_HEADER], [0, 253, 254, 255], 'tags as the store format has them');
});

t.test('alloc grows the file in one run, and the next run follows it', async (t) => {
  const a = new Allocator(1);
  t.same(a.alloc(3, 1), [1, 3]);
  t.equal(a.end, 4);
  t.same(a.alloc(2, REF_META), [4, 2]);
  t.equal(a.end, 6);
  t.same(tags(a, 0, 7), [REF_HEADER, 1, 1, 1, REF_META, REF_META, REF_FREE]);
  t.equal(a.allocOne(2), 6);
  t.equal(a.refs[6], 2);
  t.same(a.alloc(0, 1), [], 'nothing asked, nothing given');
  t.equal(a.end, 7);
});

t.test('holes are reused before the file grows; a run ending at the end merges with the growth', async (t) => {
  const a = new Allocator(1);
  a.alloc(8, 1); // chunks 1..8
  a.free(3);
  a.free(4);
  a.free(6);
  t.equal(a.freeChunks, 3);
  t.same(a.alloc(4, 2), [3, 2, 6, 1, 9, 1], 'holes 3-4 and 6, then one chunk past the end');
  t.equal(a.freeChunks, 0);
  t.equal(a.end, 10);
  t.same(tags(a, 1, 10), [1, 1, 2, 2, 1, 2, 1, 1, 2]);
  a.free(9);
  t.same(a.alloc(3, 3), [9, 3], 'the freed last chunk and the growth are one run');
  t.equal(a.end, 12);
});

t.test('free: the lowest free chunk is found first, freeing twice counts once', async (t) => {
  const a = new Allocator(1);
  a.alloc(10, 1);
  a.free(8);
  a.free(8);
  t.equal(a.freeChunks, 1, 'double free is a no-op');
  t.equal(a.allocOne(1), 8);
  a.free(9);
  a.free(2);
  t.equal(a.allocOne(1), 2, 'a lower free chunk moves the search back');
  t.equal(a.allocOne(1), 9);
  t.equal(a.freeChunks, 0);
  t.equal(a.allocOne(1), 11, 'then the file grows');
});

t.test('unref counts references down; only data chunks have any', async (t) => {
  const a = new Allocator(1);
  const c = a.allocOne(3);
  t.equal(a.unref(c), false);
  t.equal(a.refs[c], 2);
  t.equal(a.unref(c), false);
  t.equal(a.unref(c), true, 'the last reference gone');
  t.equal(a.refs[c], REF_FREE);
  t.equal(a.freeChunks, 0, 'unref does not free: the caller decides (limbo or free)');
  t.equal(a.unref(c), false, 'a free chunk has no reference to lose');
  for (const tag of [REF_LIMBO, REF_META, REF_HEADER, 128]) {
    const m = a.allocOne(tag);
    t.equal(a.unref(m), false, `tag ${tag}`);
    t.equal(a.refs[m], tag, `tag ${tag} unchanged`);
  }
  const top = a.allocOne(127);
  t.equal(a.unref(top), false);
  t.equal(a.refs[top], 126, '127 is a reference count');
});

t.test('limbo: a freed chunk waiting for durability is neither reused nor trimmed', async (t) => {
  const a = new Allocator(1);
  a.alloc(4, 1); // 1..4
  a.markUsed(4, REF_LIMBO);
  a.free(2);
  t.same(a.alloc(2, 1), [2, 1, 5, 1], 'the limbo chunk is skipped');
  a.free(5);
  t.equal(a.usedEnd(), 5, 'a limbo chunk at the tail keeps the file that long');
  a.free(4);
  t.equal(a.usedEnd(), 4, 'freed from limbo, the tail can go');
  t.equal(a.allocOne(1), 4, 'and it is reused');
});

t.test('recount after replay set refs directly; a drifted counter falls back to the scan', async (t) => {
  const a = new Allocator(2, 10);
  t.equal(a.end, 10);
  t.equal(a.freeChunks, 0, 'before recount the chunks of an opened file are not counted');
  a.refs.set([1, 1, REF_META], 2); // replay: 2, 3 data, 4 metadata; 5..9 free
  a.recount();
  t.equal(a.freeChunks, 5);
  t.same(a.alloc(2, 1), [5, 2]);
  t.equal(a.freeChunks, 3);
  // markUsed sets a tag without counting: the counter now says 3 free where none is.
  for (let c = 7; c < 10; c++) a.markUsed(c, REF_META);
  t.equal(a.freeChunks, 3);
  t.same(a.alloc(2, 1), [10, 2], 'no free chunk found: the file grows');
  t.equal(a.freeChunks, 0, 'the counter is corrected by the scan');
  a.markUsed(20, REF_META);
  t.equal(a.end, 21, 'markUsed past the end extends the file');
  a.recount();
  t.equal(a.freeChunks, 8, 'chunks 12..19 free');
});

t.test('usedEnd and shrinkTo drop a free tail', async (t) => {
  const a = new Allocator(1);
  a.alloc(10, 1); // 1..10
  for (const c of [4, 8, 9, 10]) a.free(c);
  t.equal(a.freeChunks, 4);
  t.equal(a.usedEnd(), 8);
  a.shrinkTo(a.usedEnd());
  t.equal(a.end, 8);
  t.equal(a.freeChunks, 1, 'only the hole at 4 is left');
  t.same(a.alloc(3, 2), [4, 1, 8, 2], 'the hole, then growth from the new end');
  t.equal(a.end, 10);
  const b = new Allocator(3);
  b.alloc(2, 1);
  b.free(3);
  b.free(4);
  t.equal(b.usedEnd(), 3, 'never below the header');
  b.shrinkTo(3);
  t.equal(b.freeChunks, 0);
  t.equal(b.allocOne(1), 3);
});

t.test('shrinkTo clears the dropped chunks, in use or not, and pulls the search back', async (t) => {
  const a = new Allocator(1);
  a.alloc(10, 1);
  a.shrinkTo(5);
  t.same(tags(a, 5, 11), [0, 0, 0, 0, 0, 0]);
  t.equal(a.freeChunks, 0);
  t.same(a.alloc(2, 2), [5, 2], 'allocation continues at the new end');
});

t.test('the table grows past its first size and keeps what it held', async (t) => {
  const a = new Allocator(1);
  const first = a.bytes;
  const runs = a.alloc(first + 500, 7);
  t.same(runs, [1, first + 500]);
  t.ok(a.bytes >= first + 501, 'grown');
  t.equal(a.refs[0], REF_HEADER);
  t.equal(a.refs[first + 500], 7);
  t.equal(a.refs[first + 501], REF_FREE);
  a.markUsed(a.bytes + 10, REF_META);
  t.equal(a.refs[a.end - 1], REF_META, 'markUsed grows the table too');
  t.equal(a.refs[1], 7);
});
