import t from 'tap';
import { parseSize, parseSizeNumber, formatSize } from '../../daemon/sizes.js';

t.test('suffixes are 1024-based like lvcreate', async (t) => {
  t.equal(parseSize('16m'), 16n << 20n);
  t.equal(parseSize('1G'), 1n << 30n);
  t.equal(parseSize('2T'), 2n << 40n);
  t.equal(parseSize('4KiB'), 4096n);
  t.equal(parseSize('512'), 512n);
});

t.test('bad sizes are refused with the code', async (t) => {
  t.throws(() => parseSize('12x'), { code: 'COWBD_INVALID_SIZE' });
  t.throws(() => parseSize('-1'), { code: 'COWBD_INVALID_SIZE' });
  t.throws(() => parseSizeNumber('0'), { code: 'COWBD_INVALID_SIZE' });
  t.throws(() => parseSizeNumber('9E'), { code: 'COWBD_INVALID_SIZE' });
  t.throws(() => parseSizeNumber('1000', 512), { code: 'COWBD_INVALID_SIZE' });
});

t.test('formatSize', async (t) => {
  t.equal(formatSize(1 << 30), '1GiB');
  t.equal(formatSize(1536), '1.50KiB');
});
