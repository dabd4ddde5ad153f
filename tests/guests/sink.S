# sink: host -> guest serial throughput. Parameters on the PVH command line, `KEY=N` words,
# decimal or 0x hex, defaults in brackets:
#   divisor=N  COM1 divisor latch [1 = 115200 baud]
#   lcr=N      line control, the frame [3 = 8N1; 0x1e = 7E2]
#   count=N    bytes to receive [1024]
#   polls=N    LSR reads to wait for each byte before giving up [1000000]
# Programs COM1 (FIFOs on, no interrupts), prints "READY\n", reads `count` bytes polling LSR.DR
# (bounded), checks them against the pattern 'A'..'Z' repeated, prints "GOT <n> BAD <m>\n"
# (n bytes received, m of them not the expected letter), waits for LSR.TEMT and powers off.
# resources/bench-serial.py sends the bytes after READY and times them up to the 'G'.
	.code32
	.include "common.inc"

	.set SI_CMDLINE, 24		# hvm_start_info.cmdline_paddr (u64; the low half is enough)
	.set LSR_TEMT, 0x40

	program_start
	mov start_info, %ebx
	mov SI_CMDLINE(%ebx), %edi
	mov $key_divisor, %esi
	mov $1, %eax
	call getarg
	mov %eax, divisor
	mov $key_lcr, %esi
	mov $LCR_8N1, %eax
	call getarg
	mov %eax, lcr
	mov $key_count, %esi
	mov $1024, %eax
	call getarg
	mov %eax, count
	mov $key_polls, %esi
	mov $POLL_LIMIT, %eax
	call getarg
	mov %eax, polls

	call uart_setup
	mov $msg_ready, %esi
	call puts
	xor %edi, %edi			# bytes received
	xor %ebp, %ebp			# bytes not as expected
	mov $'A', %bl			# the expected byte
1:	cmp count, %edi
	jae 5f
	mov polls, %ecx
2:	inb COM1 + UART_LSR
	test $LSR_DR, %al
	jnz 3f
	dec %ecx
	jnz 2b
	jmp 5f				# nothing came: report what did
3:	inb COM1 + UART_RBR
	cmp %bl, %al
	je 4f
	inc %ebp
4:	inc %edi
	inc %bl
	cmp $'Z', %bl
	jbe 1b
	mov $'A', %bl
	jmp 1b
5:	mov $msg_rx_got, %esi
	call puts
	mov %edi, %eax
	call putdec
	mov $msg_bad, %esi
	call puts
	mov %ebp, %eax
	call putdec
	mov $'\n', %al
	call putc
	call wait_temt
	jmp poweroff

	.include "line.inc"

	.section .rodata
key_divisor:
	.asciz "divisor="
key_lcr:
	.asciz "lcr="
key_count:
	.asciz "count="
key_polls:
	.asciz "polls="
msg_ready:
	.asciz "READY\n"
msg_rx_got:
	.asciz "GOT "
msg_bad:
	.asciz " BAD "
	.data
	.balign 4
divisor:
	.long 0
lcr:
	.long 0
count:
	.long 0
polls:
	.long 0
	.text
